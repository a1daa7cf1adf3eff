"""Routing: routers that pick top-k experts per token, and top-k schedules."""

from .routers import ROUTERS, Router, Routes, balance_loss, build_router
from .schedule import TopKSchedule

__all__ = ["ROUTERS", "Router", "Routes", "TopKSchedule", "balance_loss", "build_router"]
