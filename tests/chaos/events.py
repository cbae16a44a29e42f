"""The event sequence of a chaos run, drawn from the seed alone.

`generate(seed, nodes, seconds, ...)` returns the same list of `Event`s for the same
arguments: what happens (kind), to which node, when (seconds from the start), for how
long, and for a reload the configuration it installs (`Plan`, the logical job list and
settings; `nodes.render` turns it into each node's YAML). Nothing here runs anything.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

# Event kinds. A reload is "reload:<mutation>"; --exclude takes either form, and
# "job:<mode>" leaves the jobs of that kind out of the job list.
KINDS = ("reload", "term", "kill", "pause", "outage", "lock", "once")
JOB_MODES = ("fail", "timeout", "stuck")
MUTATIONS = ("add", "remove", "rename", "disable", "every", "timezone", "max_workers",
             "lock_dir", "cluster", "metrics")
EVERY_CHOICES = (2, 3, 4, 5)
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")


@dataclass(frozen=True)
class JobPlan:
    """One job of the logical job list. `base` names the job across renames."""
    base: str
    name: str
    every: int
    idempotent: bool
    mode: str            # ok: sleep then write; fail: raise; timeout: a statement
    seconds: float       # longer than `timeout`; stuck: Python sleep past `timeout`
    timeout: float | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Plan:
    """The logical configuration every node runs (each with its own lock_dir and node
    name): the version number says which reload installed it."""
    version: int
    jobs: tuple[JobPlan, ...]
    timezone: str = "UTC"
    max_workers: int = 3
    pool_extra: int = 1
    lock: str = "a"           # which of the host's two lock directories
    lease: float = 4.0
    heartbeat: float = 1.0
    metrics: bool = False
    shutdown_timeout: float = 2.0
    misfire_grace_time: float = 3.0

    def job(self, name: str) -> JobPlan | None:
        return next((job for job in self.jobs if job.name == name), None)


def initial_plan(exclude: frozenset[str] = frozenset()) -> Plan:
    """The job list every run starts with: idempotent and non-idempotent jobs, short
    schedules, jobs that sleep past their interval, fail, time out in a statement,
    and get stuck in Python past their timeout (less those excluded as job:<mode>)."""
    plan = Plan(0, (
        JobPlan("tick", "tick", 2, True, "ok", 0.1),
        JobPlan("ledger", "ledger", 3, False, "ok", 0.2),
        JobPlan("slow", "slow", 4, False, "ok", 5.0),
        JobPlan("flaky", "flaky", 3, True, "fail", 0.1),
        JobPlan("deadline", "deadline", 5, False, "timeout", 3.0, timeout=1.0),
        JobPlan("stuck", "stuck", 7, False, "stuck", 9.0, timeout=1.0),
    ))
    return replace(plan, jobs=tuple(job for job in plan.jobs
                                    if f"job:{job.mode}" not in exclude))


@dataclass(frozen=True)
class Event:
    at: float                  # seconds after the start
    kind: str
    node: int = 0              # the node it is applied to (0-based)
    duration: float = 0.0      # pause, outage, lock: how long
    mutation: str | None = None
    plan: Plan | None = None   # reload: the configuration it installs
    jobs: tuple[str, ...] = field(default=())   # once: the jobs it runs (empty: all)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.mutation}" if self.mutation else self.kind

    def describe(self) -> str:
        target = f" node n{self.node + 1}"
        if self.kind == "reload":
            return f"reload ({self.mutation}) -> config v{self.plan.version}"
        if self.kind in ("pause", "outage", "lock"):
            return f"{self.kind}{target if self.kind != 'lock' else ''} for {self.duration:.1f}s"
        if self.kind == "once":
            return f"--once on host n{self.node + 1}" + (
                f" --job {' --job '.join(self.jobs)}" if self.jobs else "")
        return f"{self.kind}{target} and restart"


def excluded(label: str, exclude: frozenset[str]) -> bool:
    kind = label.split(":", 1)[0]
    return label in exclude or kind in exclude


def applicable(backend: str, nodes: int) -> frozenset[str]:
    """Kinds that cannot happen on this set-up: no server to cut on SQLite, no run
    table to lock or cluster settings to change with one node."""
    out = set()
    if backend == "sqlite":
        out.add("outage")
    if nodes == 1:
        out.update({"lock", "reload:cluster"})
    return frozenset(out)


def generate(seed: int, nodes: int, seconds: float, backend: str = "sqlite",
             exclude: frozenset[str] = frozenset()) -> list[Event]:
    """The events of a run: a pure function of its arguments."""
    rng = random.Random(f"chaos:{seed}")
    skip = exclude | applicable(backend, nodes)
    kinds = [k for k in KINDS if k not in skip]
    mutations = [m for m in MUTATIONS if not excluded(f"reload:{m}", skip)]
    if not mutations and "reload" in kinds:
        kinds.remove("reload")
    modes = tuple(m for m in ("ok",) + JOB_MODES if f"job:{m}" not in skip)
    weights = {"reload": 5, "term": 1, "kill": 1, "pause": 1, "outage": 1, "lock": 1,
               "once": 1}
    plan = initial_plan(exclude)
    events: list[Event] = []
    at = rng.uniform(4.0, 6.0)     # let every node start first
    end = seconds - 3.0            # and settle before the end
    while at < end and kinds:
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        node = rng.randrange(nodes)
        if kind == "reload":
            mutation = rng.choice(mutations)
            plan = mutate(plan, mutation, rng, modes)
            events.append(Event(round(at, 3), kind, node, mutation=mutation, plan=plan))
        elif kind in ("pause", "outage", "lock"):
            events.append(Event(round(at, 3), kind, node,
                                duration=round(rng.uniform(1.0, 6.0), 2)))
        elif kind == "once":
            names = [job.name for job in plan.jobs]
            chosen = tuple(sorted(rng.sample(names, rng.randint(1, 2)))) \
                if rng.random() < 0.5 else ()
            events.append(Event(round(at, 3), kind, node, jobs=chosen))
        else:
            events.append(Event(round(at, 3), kind, node))
        at += rng.uniform(1.5, 4.5)
    return events


def mutate(plan: Plan, mutation: str, rng: random.Random,
           modes: tuple[str, ...] = ("ok",) + JOB_MODES) -> Plan:
    """The plan after one random change of this kind (a new version); an added job
    is of one of `modes`."""
    jobs = list(plan.jobs)
    version = plan.version + 1
    if mutation == "add":
        mode = rng.choice(("ok", "fail"))
        jobs.append(JobPlan(f"extra{version}", f"extra{version}", rng.choice(EVERY_CHOICES),
                            rng.random() < 0.5, mode if mode in modes else "ok",
                            round(rng.uniform(0.1, 1.5), 2)))
    elif mutation == "remove" and len(jobs) > 3:
        jobs.pop(rng.randrange(len(jobs)))
    elif mutation == "rename":
        index = rng.randrange(len(jobs))
        jobs[index] = replace(jobs[index], name=f"{jobs[index].base}-v{version}")
    elif mutation == "disable":
        index = rng.randrange(len(jobs))
        jobs[index] = replace(jobs[index], enabled=not jobs[index].enabled)
    elif mutation == "every":
        index = rng.randrange(len(jobs))
        choices = [e for e in EVERY_CHOICES if e != jobs[index].every]
        jobs[index] = replace(jobs[index], every=rng.choice(choices))
    elif mutation == "timezone":
        return replace(plan, version=version,
                       timezone=rng.choice([z for z in ZONES if z != plan.timezone]))
    elif mutation == "max_workers":
        return replace(plan, version=version, max_workers=rng.randint(2, 5),
                       pool_extra=rng.randint(0, 2))
    elif mutation == "lock_dir":
        return replace(plan, version=version, lock="b" if plan.lock == "a" else "a")
    elif mutation == "cluster":
        lease = rng.choice((3.0, 4.0, 6.0))
        return replace(plan, version=version, lease=lease,
                       heartbeat=rng.choice((0.5, 1.0)))
    elif mutation == "metrics":
        return replace(plan, version=version, metrics=not plan.metrics)
    return replace(plan, version=version, jobs=tuple(jobs))
