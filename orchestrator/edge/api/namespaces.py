"""``/api/v1/namespaces``: list, create and delete namespaces."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from orchestrator.edge.api.auth import AdminNs, Client, CurrentToken, ReadNs, authorize
from orchestrator.edge.api.errors import at_field, responses
from orchestrator.edge.api.jobs import accepted
from orchestrator.edge.api.schemas import NamespaceCreate, NamespaceDeleted, QuotaIn
from orchestrator.model.errors import NotFound
from orchestrator.model.records import Job, Namespace
from orchestrator.services.client import RedisClient
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1/namespaces", tags=["namespaces"])


@router.get("", response_model=list[Namespace], responses=responses(503),
            summary="The namespaces the token covers")
def list_namespaces(client: Client, token: CurrentToken) -> list[Namespace]:
    return [ns for ns in client.namespaces() if token.covers(ns.name)]


@router.post("", status_code=201, response_model=Namespace, responses=responses(403, 409, 503),
             summary="Create a namespace, optionally limited to some hosts")
def create_namespace(body: NamespaceCreate, client: Client, token: CurrentToken, response: Response) -> Namespace:
    """Needs role ``admin`` on that namespace."""
    authorize(token, Role.ADMIN, body.name)
    with at_field("body.hosts"):  # its one invalid input: a host the cluster doesn't have
        created = client.create_namespace(body.name, body.hosts)
    client.store.add_event(body.name, kind="namespace", state="created", by=client.actor,
                           detail=f"hosts {','.join(body.hosts)}" if body.hosts else "all hosts")
    response.headers["Location"] = f"/api/v1/namespaces/{body.name}"
    return created


@router.get("/{ns}", response_model=Namespace, responses=responses(403, 404, 503), summary="One namespace")
def get_namespace(ns: ReadNs, client: Client) -> Namespace:
    found = client.store.namespace(ns)
    if found is None:
        raise NotFound(f"no namespace {ns!r}", hint="see 'vmorch ns list'")
    return found


@router.put("/{ns}/quota", response_model=Namespace, responses=responses(403, 404, 503),
            summary="Set a namespace's quota (its limits; null or 0 = no limit)")
def set_quota(body: QuotaIn, ns: AdminNs, client: Client) -> Namespace:
    """Replaces every limit: a field left out is no limit (``PATCH`` changes only the limits given).
    Checked atomically when launches are accepted (409 ``no_capacity`` naming what ran out). Role ``admin``."""
    found = client.set_quota(ns, body)
    _quota_event(client, found)
    return found


@router.patch("/{ns}/quota", response_model=Namespace, responses=responses(403, 404, 503),
              summary="Change some of a namespace's limits (0 = no limit; null or absent = unchanged)")
def update_quota(body: QuotaIn, ns: AdminNs, client: Client) -> Namespace:
    """Sets the limits given, in one atomic step on the server: concurrent changes of different limits
    all hold (``vmorch ns quota`` uses this). Answers the namespace as this change left it. Role ``admin``."""
    found = client.update_quota(ns, body)
    _quota_event(client, found)
    return found


def _quota_event(client: RedisClient, found: Namespace) -> None:
    client.store.add_event(found.name, kind="namespace", state="quota", by=client.actor,
                           detail=", ".join(f"{k} {v}" for k, v in found.quota.model_dump().items() if v) or "none")


@router.post("/{ns}/deletion", status_code=202, response_model=list[Job], responses=responses(403, 404, 503),
             summary="Start deleting a namespace: its VMs go through delete jobs")
def start_delete(ns: AdminNs, client: Client, response: Response,
                 force: Annotated[bool, Query(description="also delete its VMs")] = False) -> list[Job]:
    """No launch gets in from now on. Wait for the jobs, then ``DELETE`` the namespace. Role ``admin``."""
    return accepted(response, client.delete_namespace(ns, force=force))


@router.delete("/{ns}", response_model=NamespaceDeleted, responses=responses(403, 409, 503),
               summary="Remove an empty namespace with its jobs and history")
def finish_delete(ns: AdminNs, client: Client) -> NamespaceDeleted:
    """409 while it still has VMs (start with ``POST .../deletion?force=true``). Role ``admin``."""
    return NamespaceDeleted(namespace=ns, removed_keys=client.finish_namespace_delete(ns))
