"""``/v1/tasks``: the tasks mutations through the center became (``center.tasks``): list them
(filtered, sorted, paged), show one, cancel one that has not started. A role without
``vm.all`` sees and cancels its own tasks only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center import tasks
from aecp.center.accounts import Caller
from aecp.center.api.deps import CenterRoute, UnitOfWork, audited, bearer, center, needs
from aecp.center.db.models import Task
from aecp.common.apierrors import error_responses
from aecp.common.errors import NotFound

router = APIRouter(
    prefix="/v1/tasks", tags=["tasks"], dependencies=[Depends(bearer)], route_class=CenterRoute
)
MayRead = Annotated[Caller, Depends(needs("task.read"))]
MayWrite = Annotated[Caller, Depends(needs("task.write"))]
TaskSort = Literal[
    "created_at", "-created_at", "finished_at", "-finished_at", "state", "kind", "cluster"
]
MAX_OFFSET = 1_000_000


class Step(BaseModel):
    at: float
    sentence: str


class TaskPublic(BaseModel):
    id: str
    kind: str
    cluster: str
    target: str
    user: str
    state: tasks.TaskState
    progress: int = Field(description="0..100")
    steps: list[Step] = Field(description="what was decided and done, oldest first")
    error: str
    cluster_operation: str = Field(description="the cluster's operation this task follows")
    created_at: float
    started_at: float = Field(description="0: not started")
    finished_at: float = Field(description="0: not finished")

    @classmethod
    def of(cls, t: Task) -> TaskPublic:
        return cls(
            id=t.id,
            kind=t.kind,
            cluster=t.cluster,
            target=t.target,
            user=t.user,
            state=tasks.TaskState(t.state),
            progress=t.progress,
            steps=[Step(**s) for s in tasks.steps(t)],
            error=t.error,
            cluster_operation=t.cluster_operation,
            created_at=t.created_at,
            started_at=t.started_at,
            finished_at=t.finished_at,
        )


def visible(db: DB, who: Caller, task_id: str) -> Task:
    """The task, if ``who`` may see it (another user's task is ``NotFound`` without
    ``vm.all``: its existence is not told)."""
    task = tasks.get(db, task_id)
    if not who.may("vm.all") and task.user != who.user:
        raise NotFound(f"no task {task_id!r}", task=task_id)
    return task


@router.get("", operation_id="list_tasks", responses=error_responses(401, 403, 422))
def list_tasks(
    db: UnitOfWork,
    who: MayRead,
    response: Response,
    state: Annotated[tasks.TaskState | None, Query()] = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    user: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=256)] = None,
    sort: Annotated[TaskSort, Query(description="a field; '-' first: descending")] = "-created_at",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[TaskPublic]:
    """Tasks, newest first unless ``sort`` says otherwise; ``X-Total-Count`` is how many
    match the filters."""
    q = select(Task)
    filters: dict[str, Any] = {
        "state": state.value if state else None,
        "cluster": cluster,
        "user": user,
        "kind": kind,
        "target": target,
    }
    if not who.may("vm.all"):
        if user not in (None, who.user):  # another's tasks: none to see
            response.headers["X-Total-Count"] = "0"
            return []
        filters["user"] = who.user
    for field, value in filters.items():
        if value is not None:
            q = q.where(getattr(Task, field) == value)
    total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    column = getattr(Task, sort.lstrip("-"))
    q = q.order_by(column.desc() if sort.startswith("-") else column, Task.seq.desc())
    response.headers["X-Total-Count"] = str(total)
    return [TaskPublic.of(t) for t in db.scalars(q.limit(limit).offset(offset))]


@router.get("/{task_id}", operation_id="get_task", responses=error_responses(401, 403, 404))
def get_task(task_id: str, db: UnitOfWork, who: MayRead) -> TaskPublic:
    return TaskPublic.of(visible(db, who, task_id))


@router.post(
    "/{task_id}/cancel", operation_id="cancel_task", responses=error_responses(401, 403, 404, 409)
)
def cancel_task(task_id: str, request: Request, db: UnitOfWork, who: MayWrite) -> TaskPublic:
    """Cancel a task that has not started (409 for one executing or ended)."""
    c = center(request)

    def work() -> Task:
        visible(db, who, task_id)
        return tasks.cancel_task(db, task_id, who.user, c.clock.wall())

    return TaskPublic.of(
        audited(request, who.user, "task.cancel", task_id, {}, work, task_of=lambda t: t.id)
    )


def submitted(request: Request, background: BackgroundTasks) -> None:
    """Wake the runner once the request's unit of work has committed (after the answer)."""
    runner = getattr(request.app.state, "runner", None)
    if runner is not None:
        background.add_task(runner.wake)
