"""``/api/v1/namespaces/{ns}/networks``: a namespace's networks.

Who may do what: reading takes ``read``; creating and deleting a network takes ``operate`` in its
namespace (a network is the namespace's own, as its VMs are, and reaches no host), except
``nat: true``, which takes ``admin``: it opens a way out of the cluster through a host.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.edge.api.auth import Client, CurrentToken, OperateNs, ReadNs, authorize
from orchestrator.edge.api.errors import at_field, responses
from orchestrator.edge.api.schemas import HostName, Name
from orchestrator.model.names import refuse_bad_text
from orchestrator.model.network import Network, NetworkSpec
from orchestrator.model.operation import invalid_input
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1/namespaces/{ns}/networks", tags=["networks"])
NetName = Annotated[Name, Path(description="network name")]


@router.get("", response_model=list[Network], responses=responses(403, 503), summary="The namespace's networks")
def list_networks(ns: ReadNs, client: Client) -> list[Network]:
    return client.networks(ns)


@router.get("/{name}", response_model=Network, responses=responses(403, 404, 503),
            summary="One network: its VNI, gateway host, the hosts it is up on, its DHCP leases")
def get_network(ns: ReadNs, name: NetName, client: Client) -> Network:
    return client.network(ns, name)


class NetworkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    #: an IPv4 subnet, /16 to /29, host bits zero (``10.10.0.0/24``)
    subnet: str = Field(max_length=18, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")
    #: a DHCP server on the gateway host hands out the subnet's addresses
    dhcp: bool = True
    #: guests reach outside addresses through the gateway host (admins only)
    nat: bool = False
    #: the gateway host (null: the up host with the fewest gateways)
    host: HostName | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        return refuse_bad_text(data, cls.__name__)


@router.post("", status_code=201, response_model=Network, responses=responses(403, 409, 503),
             summary="Create a network (state creating until its gateway host has brought it up)")
def create_network(ns: OperateNs, body: NetworkCreate, client: Client, token: CurrentToken) -> Network:
    if body.nat:
        authorize(token, Role.ADMIN, ns)
    with at_field("body.subnet"):
        try:
            spec = NetworkSpec(**body.model_dump())
        except ValidationError as exc:
            raise invalid_input(exc) from None
    return client.create_network(ns, spec)


@router.delete("/{name}", response_model=Network, responses=responses(403, 404, 503),
               summary="Delete a network with no VM on it (state deleting until its gateway is torn down)")
def delete_network(ns: OperateNs, name: NetName, client: Client) -> Network:
    return client.delete_network(ns, name)


@router.post("/{name}/capture", response_class=Response, responses={**responses(403, 404, 503), 200: {
    "content": {"application/vnd.tcpdump.pcap": {}}, "description": "the packets, as a pcap file"}},
    summary="Capture the network's packets for some seconds (on one VM's NIC, or at its gateway)")
def capture(ns: OperateNs, name: NetName, client: Client,
            seconds: Annotated[float, Query(gt=0, le=300, description="how long to capture")] = 10.0,
            vm: Annotated[Name | None, Query(description="capture on this VM's NIC on the network")] = None,
            ) -> Response:
    data = client.capture(ns, name, vm=vm, seconds=seconds)
    return Response(content=data, media_type="application/vnd.tcpdump.pcap",
                    headers={"Content-Disposition": f'attachment; filename="{name}.pcap"'})
