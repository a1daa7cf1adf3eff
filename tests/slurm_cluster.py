"""A real one-node Slurm cluster on localhost for tests.

`munged`, `slurmctld` and `slurmd` run as foreground child processes with all their files (configuration,
state, spool, logs, MUNGE key and socket) in one temporary directory, on free TCP ports, without systemd or
cgroups. conftest.py registers this module as a plugin, so tests just ask for the `slurm` fixture; client
commands get the cluster through `SlurmCluster.env` (`SLURM_CONF`).
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from smoe.launcher.runtime.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})

# A requeued job may start again only cred_expire + 1 s later (default 120 s; below 5 s Slurm ignores it and
# keeps 120), and sched_interval is how often the scheduler looks at such pending jobs (default 60 s).
# There is no accounting (no sacct): `scontrol show job` keeps a finished job for MinJobAge seconds.
SLURM_CONF_TEMPLATE = """\
ClusterName=smoe-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
PlugStackConfig={root}/plugstack.conf
SlurmctldDebug=debug
SlurmdDebug=debug
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured and kept under `root`."""

    def __init__(self, root):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}
        self.processes = {}

    def start(self, timeout=30):
        """Write the configuration, start the daemons and wait until the node is idle."""
        for folder in ("state", "spool", "logs"):
            (self.root / folder).mkdir()
        (self.root / "plugstack.conf").touch()
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(host=self.host, root=self.root, ctld_port=free_port(),
                                               slurmd_port=free_port(), cpus=max(2, os.cpu_count() or 1)))
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", "--foreground", "--force", f"--socket={self.root}/munge.socket",
                    f"--key-file={key}", f"--pid-file={self.root}/munged.pid",
                    f"--seed-file={self.root}/munged.seed", f"--log-file={self.root}/logs/munged.log")
        self._wait_for(lambda: (self.root / "munge.socket").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self._wait_for(lambda: self.node_state() == "IDLE", timeout, f"node {self.host} to become IDLE")

    def stop(self):
        """Cancel every job, then SIGKILL the daemons (slurmd first) and whatever the jobs left running."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            jobs = self.run("squeue", "--noheader", "--format=%A", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
        for process in reversed(self.processes.values()):  # SIGTERM would make slurmd wait KillWait for steps
            process.kill()
            process.wait()
        self._kill_leftovers()

    def run(self, *command, check=True, env=None):
        """Run a Slurm client command against this cluster and return its stdout."""
        result = subprocess.run(command, env={**self.env, **(env or {})}, cwd=self.root, text=True,
                                capture_output=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, script, *args, options=(), env=None):
        """Submit `script args` with extra sbatch `options`; the job environment is `env` over `self.env`.

        The job runs in `self.root` (unless `--chdir` is given), so `slurm-<id>.out` lands there."""
        return self.run("sbatch", "--parsable", *options, str(script), *args, env=env).strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job` as a dict of its `Key=Value` fields (values holding spaces are cut at them)."""
        text = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def state(self, job_id):
        """The job's state, e.g. PENDING, RUNNING, COMPLETED, CANCELLED."""
        return self.job(job_id)["JobState"]

    def wait(self, job_id, timeout=60, states=FINAL_STATES):
        """Poll until the job reaches one of `states` (by default a final one) and return that state."""
        def reached():
            state = self.state(job_id)
            return state if state in states else None
        return self._wait_for(reached, timeout, f"job {job_id} to reach {'/'.join(sorted(states))}")

    def signal(self, job_id, name, *options):
        """`scancel --signal=name` with extra options such as `--batch` or `--full`."""
        self.run("scancel", f"--signal={name}", *options, str(job_id))

    def node_state(self):
        """The node's state as `sinfo` prints it, e.g. IDLE, ALLOCATED, DOWN*, or '' while unreachable."""
        return self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).strip().upper()

    def logs(self):
        """Every daemon log, each under a header, for failure messages."""
        return "\n".join(f"===== {path.name} =====\n{path.read_text(errors='replace')}"
                         for path in sorted((self.root / "logs").glob("*.log")))

    def _spawn(self, name, *args):
        with open(self.root / "logs" / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen([name, *args], env=self.env, stdin=subprocess.DEVNULL,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for(self, condition, timeout, what):
        """Poll `condition` until it returns something true and return that; fail with the logs if a daemon
        exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                reason = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout} s"
                raise TimeoutError(f"Waiting for {what}: {reason}.\n{self.logs()}")
            time.sleep(0.2)
        return result

    def _kill_leftovers(self):
        """SIGKILL every process carrying this cluster's SLURM_CONF (slurmd sets it for every job process),
        until none is left: slurmstepd and job tasks outlive slurmd."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        for _ in range(10):
            found = []
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if int(proc.name) != os.getpid() and marker in (proc / "environ").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                        found.append(proc.name)
                except OSError:
                    pass
            if not found:
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A started `SlurmCluster`, shared by the tests of one module; skips where Slurm or MUNGE is missing."""
    missing = [name for name in DAEMONS if shutil.which(name, path=SBIN_PATH) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd starts jobs as their user)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
