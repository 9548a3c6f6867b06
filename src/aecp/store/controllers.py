"""The controller runtime: controllers of cluster-wide roles (scheduler, later HA, drain,
migration), each run by one node at a time, hosted alike in every node process.

A controller is a role name and ``run_pass(new_term)``, which looks at the cluster, acts, and
returns one ``Decision`` per thing it decided, each a sentence about an object. A
``ControllerHost`` takes part in the election for every role registered with it (the holder of
``/aecp/leaders/<role>``, on this node's lease, leads), runs the pass of each role it holds,
and for each decision logs its sentence tagged with the object and records it among the
object's events (``store.history``) — once per change: a decision about an object repeated
pass after pass (a VM that still cannot be placed) is logged and recorded the first time only.

Adding a controller is a module with a class of this shape and one ``register`` line where
the node process builds its host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from aecp.common.errors import AecpError
from aecp.store.base import Lease, Store
from aecp.store.election import Election
from aecp.store.history import History

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One decision of a controller: ``sentence`` about object ``name`` of ``kind`` (``vm``,
    ``node``, ...; both empty for a decision about no one object)."""

    sentence: str
    kind: str = ""
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.sentence}" if self.kind else self.sentence


class Controller(Protocol):
    """A cluster-wide role: run by the one node that holds it."""

    @property
    def role(self) -> str: ...

    async def run_pass(self, new_term: bool) -> list[Decision]:
        """Look, act, say what was decided. ``new_term``: the first pass since this node took
        the role (work a previous holder may have left half done is looked at then)."""
        ...


class ControllerHost:
    """Runs the controllers of the roles this node holds; see the module docstring."""

    def __init__(
        self,
        store: Store,
        node: str,
        history: History | None = None,
        controllers: Iterable[Controller] = (),
    ) -> None:
        self.store, self.node, self.history = store, node, history
        self._controllers: list[Controller] = []
        self._elections: dict[str, Election] = {}
        self._held: set[str] = set()  # roles led at the last pass
        self._said: dict[tuple[str, str, str], str] = {}  # (role, kind, name) -> last sentence
        for c in controllers:
            self.register(c)

    def register(self, controller: Controller) -> None:
        if controller.role in self._elections:
            raise ValueError(f"role {controller.role} registered twice")
        self._controllers.append(controller)
        self._elections[controller.role] = Election(self.store, controller.role, self.node)

    def leads(self, role: str) -> bool:
        """Whether this node led ``role`` at its last pass."""
        return role in self._held

    def step_down(self) -> None:
        """Lead nothing until the next pass proves otherwise (the lease was lost)."""
        self._held.clear()
        for election in self._elections.values():
            election.leading = False

    async def run_pass(self, lease: Lease | None) -> list[Decision]:
        """One pass of every role held under ``lease`` (None: the lease is not certain, so
        nothing is led). ``StoreUnavailable`` if an election cannot be checked; a failing
        controller is logged and the others still run. Returns the decisions of the pass."""
        decided: list[Decision] = []
        for c in self._controllers:
            if lease is None or not await self._elections[c.role].check(lease):
                self._held.discard(c.role)
                continue
            new_term = c.role not in self._held
            if new_term:  # what was said in an earlier term is not this term's
                self._said = {k: v for k, v in self._said.items() if k[0] != c.role}
            try:
                decisions = await c.run_pass(new_term)
            except AecpError as exc:
                log.warning("%s: pass stopped: %s", c.role, exc)
                continue  # a new term stays new until its first pass went through
            except Exception:  # a bug in one controller must not stop the others
                log.exception("%s: pass failed", c.role)
                continue
            self._held.add(c.role)
            await self._note(c.role, decisions)
            decided += decisions
        return decided

    async def _note(self, role: str, decisions: list[Decision]) -> None:
        """Log each decision, and record it among its object's events; a decision about an
        object that repeats the last one about it is neither (once per change). Decisions
        about no object are always logged."""
        said = {k: v for k, v in self._said.items() if k[0] != role}
        for d in decisions:
            if not d.kind:
                log.info("%s: %s", role, d)
                continue
            key = (role, d.kind, d.name)
            said[key] = d.sentence
            if self._said.get(key) == d.sentence:
                continue
            log.info("%s: %s", role, d)
            if self.history is None:
                continue
            try:
                await self.history.record(d.kind, d.name, role, d.sentence)
            except AecpError as exc:  # logged above; the event alone is lost
                log.warning("%s: event of %s %s not recorded: %s", role, d.kind, d.name, exc)
        self._said = said
