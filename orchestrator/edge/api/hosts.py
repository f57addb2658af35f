"""``/api/v1/hosts``: the cluster's hosts; draining them is for cluster-wide admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from orchestrator.edge.api.auth import Client, CurrentToken, authorize
from orchestrator.edge.api.errors import responses
from orchestrator.edge.api.schemas import HostName as ValidHostName
from orchestrator.model.errors import NotFound
from orchestrator.model.records import Host
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1/hosts", tags=["hosts"])

HostName = Annotated[ValidHostName, Path(description="host name")]


@router.get("", response_model=list[Host], responses=responses(503), summary="Every host (any valid token)")
def list_hosts(client: Client) -> list[Host]:
    return client.hosts()


@router.get("/{name}", response_model=Host, responses=responses(404, 503), summary="One host")
def get_host(name: HostName, client: Client) -> Host:
    for host in client.hosts():
        if host.name == name:
            return host
    raise NotFound(f"unknown host {name!r}", hint="see 'vmorch host list'")


def _set_draining(name: str, draining: bool, client: Client, token: CurrentToken) -> Host:
    authorize(token, Role.ADMIN, None)
    host = client.drain(name, draining)
    client.store.add_event(None, kind="host", vm=name, state="draining" if draining else "undrained",
                           by=client.actor, detail=f"host {name}")
    return host


@router.post("/{name}/drain", response_model=Host, responses=responses(403, 404, 503),
             summary="Place no new VMs on a host (admin of every namespace)")
def drain(name: HostName, client: Client, token: CurrentToken) -> Host:
    return _set_draining(name, True, client, token)


@router.post("/{name}/undrain", response_model=Host, responses=responses(403, 404, 503),
             summary="Let placement use a drained host again (admin of every namespace)")
def undrain(name: HostName, client: Client, token: CurrentToken) -> Host:
    return _set_draining(name, False, client, token)
