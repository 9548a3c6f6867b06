"""Operations as the API reads them (each is carried out and ended by whoever owns the change:
``model.operation``)."""

from __future__ import annotations

from aecp.common.errors import NotFound
from aecp.model.operation import Operation
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read


class OperationService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def operation(self, op_id: str) -> Operation:
        got = await read(self.store, keys.op(op_id), Operation)
        if got is None:
            raise NotFound(f"operation {op_id} does not exist", operation=op_id)
        return got[0]

    async def operations(self) -> list[Operation]:
        """Every operation, oldest first."""
        ops = [Operation.load(kv.value) for kv in await self.store.list(keys.OPS)]
        return sorted(ops, key=lambda o: o.created_at)
