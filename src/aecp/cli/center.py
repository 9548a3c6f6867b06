"""``aecp center``: the operation center (AOC)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from aecp.center.settings import CenterSettings
from aecp.cli import centerha
from aecp.cli.centerctx import center_client
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(
    help="The operation center (AOC): data centers, clusters, users, audit.", no_args_is_help=True
)
cluster_app = typer.Typer(help="Clusters registered in the center.", no_args_is_help=True)
dc_app = typer.Typer(help="Data centers.", no_args_is_help=True)
app.add_typer(centerha.app, name="ha")
user_app = typer.Typer(help="The center's users.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(dc_app, name="datacenter")
app.add_typer(user_app, name="user")
CLUSTER_COLS = ["name", "datacenter", "endpoint", "cluster_id", "created_at"]


@app.command("run")
def run(
    data_dir: Annotated[Path, typer.Option(help="where the center keeps its data")],
    address: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8800,
    database_url: Annotated[str, typer.Option(help="SQLAlchemy URL [default: SQLite]")] = "",
    database_url_file: Annotated[
        Path | None,
        typer.Option(help="a file holding the URL (keeps its password off the command line)"),
    ] = None,
    allow_private_webhooks: Annotated[
        bool, typer.Option(help="let webhooks reach loopback, link-local, metadata addresses")
    ] = False,
    ha_patroni_url: Annotated[
        str | None, typer.Option(help="HA trio: the local Patroni's REST API")
    ] = None,
    ha_management_ip: Annotated[
        str | None, typer.Option(help="HA trio: the management IP (where the active is)")
    ] = None,
    ha_status_url: Annotated[
        str | None, typer.Option(help="HA trio: the local HA agent's /status")
    ] = None,
    ha_status_token_file: Annotated[
        Path | None, typer.Option(help="HA trio: a file holding the agents' secret")
    ] = None,
) -> None:
    """Serve the center (its database is made or upgraded first; at first start the root
    user's password is written to DATA_DIR/root-password, mode 0600, and that path printed). With
    the --ha-* options it is one of an HA trio's two centers (docs/design/center-ha.md)."""
    from aecp.center.main import run as serve
    from aecp.center.settings import CenterHA

    if database_url_file is not None:
        database_url = _read(database_url_file, "--database-url-file")
    ha = None
    given = [ha_patroni_url, ha_management_ip, ha_status_url]
    if any(given):
        if not all(given):
            raise typer.BadParameter(
                "give --ha-patroni-url, --ha-management-ip and --ha-status-url together"
            )
        try:
            ha = CenterHA(
                patroni_url=ha_patroni_url,
                management_ip=ha_management_ip,
                status_url=ha_status_url,
                **_token(ha_status_token_file),
            )
        except ValidationError as e:
            raise _bad(e, "--ha-") from None
    try:
        settings = CenterSettings(
            data_dir=data_dir,
            address=address,
            port=port,
            database_url=database_url,
            allow_private_webhooks=allow_private_webhooks,
            ha=ha,
        )
    except ValidationError as e:
        raise _bad(e, "--") from None
    serve(settings)


def _bad(e: ValidationError, prefix: str) -> typer.BadParameter:
    """The first error of ``e`` as the option it came from."""
    err = e.errors()[0]
    field = str(err["loc"][-1]) if err["loc"] else ""
    return typer.BadParameter(err["msg"], param_hint=prefix + field.replace("_", "-"))


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e.strerror}", param_hint=option) from None


def _token(path: Path | None) -> dict[str, str]:
    return {} if path is None else {"status_token": _read(path, "--ha-status-token-file")}


@dc_app.command("add")
def dc_add(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Add a data center."""
    with center_client() as c:
        emit(c.post("/v1/datacenters", json={"name": name}), output)


@dc_app.command("list")
def dc_list(output: OutputOpt = Format.TABLE) -> None:
    with center_client() as c:
        emit(c.get("/v1/datacenters"), output, ["name", "created_at"])


@dc_app.command("delete")
def dc_delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a data center that has no clusters."""
    with center_client() as c:
        c.delete(f"/v1/datacenters/{name}")
    emit({"datacenter": name, "deleted": True}, output)


@cluster_app.command("add")
def cluster_add(
    name: str,
    endpoint: Annotated[str, typer.Option(help="the cluster API's URL")],
    token_file: Annotated[Path, typer.Option(help="a file holding a token of the cluster")],
    datacenter: Annotated[str, typer.Option(help="the data center it is in")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Register a cluster (its endpoint and the token are checked before anything is kept)."""
    token = token_file.read_text().strip()
    body = {"name": name, "endpoint": endpoint, "token": token, "datacenter": datacenter}
    with center_client() as c:
        emit(c.post("/v1/clusters", json=body), output, CLUSTER_COLS)


@cluster_app.command("list")
def cluster_list(
    datacenter: Annotated[str | None, typer.Option(help="only those in this one")] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    params = {"datacenter": datacenter} if datacenter else {}
    with center_client() as c:
        emit(c.get("/v1/clusters", params=params), output, CLUSTER_COLS)


@cluster_app.command("move")
def cluster_move(
    name: str,
    datacenter: Annotated[str, typer.Option(help="the data center to move it to")],
    output: OutputOpt = Format.TABLE,
) -> None:
    with center_client() as c:
        emit(c.request("PATCH", f"/v1/clusters/{name}", json={"datacenter": datacenter}), output)


@cluster_app.command("remove")
def cluster_remove(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Stop managing a cluster (the cluster itself is not touched)."""
    with center_client() as c:
        c.delete(f"/v1/clusters/{name}")
    emit({"cluster": name, "removed": True}, output)


@user_app.command("add")
def user_add(
    name: str,
    role: Annotated[str, typer.Option(help="ROOT, ADMIN, READ_ONLY, AUDITOR, VM_USER or custom")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Add a user (its password is asked for)."""
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    with center_client() as c:
        emit(c.post("/v1/users", json={"name": name, "role": role, "password": password}), output)


@user_app.command("list")
def user_list(output: OutputOpt = Format.TABLE) -> None:
    with center_client() as c:
        emit(c.get("/v1/users"), output, ["name", "role", "disabled", "locked", "created_at"])


@user_app.command("disable")
def user_disable(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Disable a user: its sessions end at once."""
    with center_client() as c:
        emit(c.request("PATCH", f"/v1/users/{name}", json={"disabled": True}), output)


@app.command("audit")
def audit(
    user: Annotated[str | None, typer.Option(help="only this user's")] = None,
    action: Annotated[str | None, typer.Option(help="only this action")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    output: OutputOpt = Format.TABLE,
) -> None:
    """The audit trail, newest first."""
    params: dict[str, object] = {"limit": limit}
    if user:
        params["user"] = user
    if action:
        params["action"] = action
    with center_client() as c:
        emit(
            c.get("/v1/audit", params=params),
            output,
            ["id", "at", "user", "address", "action", "target", "result"],
        )


task_app = typer.Typer(help="Tasks: the changes made through the center.", no_args_is_help=True)
alert_app = typer.Typer(help="Alerts of every cluster and of the center.", no_args_is_help=True)
app.add_typer(task_app, name="task")
app.add_typer(alert_app, name="alert")
TASK_COLS = ["id", "kind", "cluster", "target", "user", "state", "progress", "created_at", "error"]


@task_app.command("list")
def task_list(
    state: Annotated[str | None, typer.Option(help="pending, executing, succeeded, ...")] = None,
    cluster: Annotated[str | None, typer.Option(help="only this cluster's")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Tasks, newest first."""
    params: dict[str, object] = {"limit": limit}
    if state:
        params["state"] = state
    if cluster:
        params["cluster"] = cluster
    with center_client() as c:
        emit(c.get("/v1/tasks", params=params), output, TASK_COLS)


@task_app.command("show")
def task_show(task_id: str, output: OutputOpt = Format.TABLE) -> None:
    """One task and its steps."""
    with center_client() as c:
        task = c.get(f"/v1/tasks/{task_id}")
    if output is Format.JSON:
        emit(task, output)
        return
    steps = task.pop("steps")
    emit(task, output)
    emit(steps, output, ["at", "sentence"], title="steps")


@task_app.command("cancel")
def task_cancel(task_id: str, output: OutputOpt = Format.TABLE) -> None:
    """Cancel a task that has not started."""
    with center_client() as c:
        emit(c.post(f"/v1/tasks/{task_id}/cancel"), output, TASK_COLS)


@alert_app.command("list")
def alert_list(
    resolved: Annotated[bool, typer.Option("--resolved", help="the resolved ones")] = False,
    cluster: Annotated[str | None, typer.Option(help="only this cluster's")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Open alerts (or resolved ones), newest first."""
    params: dict[str, object] = {"state": "resolved" if resolved else "open", "limit": limit}
    if cluster:
        params["cluster"] = cluster
    with center_client() as c:
        emit(
            c.get("/v1/alerts", params=params),
            output,
            ["id", "level", "cluster", "object.name", "opened_at", "cause", "action"],
        )


@alert_app.command("acknowledge")
def alert_acknowledge(alert_id: int, output: OutputOpt = Format.TABLE) -> None:
    """Acknowledge an alert of a failed task (it resolves)."""
    with center_client() as c:
        emit(c.post(f"/v1/alerts/{alert_id}/acknowledge"), output, ["id", "state", "resolution"])
