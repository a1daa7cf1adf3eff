"""Routing: routers that pick top-k experts per token, and top-k schedules."""

from smoe.routing.routers import ROUTERS, Router, RouterOptions, Routes, assignment_counts, balance_loss, build_router
from smoe.routing.schedule import TopKSchedule

__all__ = ["ROUTERS", "Router", "RouterOptions", "Routes", "TopKSchedule", "assignment_counts", "balance_loss", "build_router"]
