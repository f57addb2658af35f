"""``/api/v1/images``: the image catalog. Any valid token reads it; importing and removing images
is for admins of every namespace (images are the cluster's, and a file:// source reads a host's files)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from orchestrator.control.images import SOURCE_MAX, check_source
from orchestrator.edge.api.auth import Client, CurrentToken, authorize
from orchestrator.edge.api.errors import responses
from orchestrator.edge.api.jobs import accepted
from orchestrator.edge.api.schemas import NAME_RULE, HostName
from orchestrator.model.errors import InvalidInput
from orchestrator.model.guestdata import check_image_name
from orchestrator.model.names import refuse_bad_text
from orchestrator.model.records import Job
from orchestrator.store.images import Image
from orchestrator.store.tokens import Role, Token

router = APIRouter(prefix="/api/v1/images", tags=["images"])


def _image_name(value: str) -> str:
    try:
        return check_image_name(value)
    except InvalidInput as exc:
        raise ValueError(f"{exc.message} ({exc.hint})") from None


def _source(value: str) -> str:
    try:
        return check_source(value, allow_file=True)  # the routes that take one are for admins of every namespace
    except InvalidInput as exc:
        raise ValueError(f"{exc.message.removeprefix('source: ')} ({exc.hint})") from None
    except ValueError as exc:  # urlsplit's: "http://[x" is no URL at all
        raise ValueError(f"{value[:80]!r} is not a URL: {exc}") from None


#: check_image_name refuses exactly what a VM name's rule refuses (a path can't match it either)
ImageName = Annotated[str, AfterValidator(_image_name), NAME_RULE]
PathName = Annotated[ImageName, Path(description="image name")]


def cluster_admin(token: CurrentToken) -> Token:
    """Admin of every namespace: checked before the body is looked at."""
    authorize(token, Role.ADMIN, None)
    return token


ClusterAdmin = Annotated[Token, Depends(cluster_admin)]


class ImageImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ImageName
    #: http(s)://... ; file:///PATH (an admin's: it reads the worker's own file)
    source: Annotated[str, AfterValidator(_source)] = Field(max_length=SOURCE_MAX)
    #: of the source's bytes; checked on every host (and then the image's identity)
    sha256: str | None = Field(default=None, max_length=64)
    #: where to import it; null or absent: every host that is up
    hosts: list[HostName] | None = Field(default=None, max_length=1000)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        return refuse_bad_text(data, cls.__name__)


@router.get("", response_model=list[Image], responses=responses(503), summary="The catalog (any valid token)")
def list_images(client: Client) -> list[Image]:
    return client.images()


@router.get("/{name}", response_model=Image, responses=responses(404, 503), summary="One image, and where it is ready")
def get_image(name: PathName, client: Client) -> Image:
    return client.image(name)


@router.post("", status_code=202, response_model=list[Job], responses=responses(403, 409, 503),
             summary="Import an image to hosts' stores: one job per host (admin of every namespace)")
def import_image(body: ImageImport, response: Response, client: Client, token: ClusterAdmin) -> list[Job]:
    jobs = client.import_image(body.name, body.source, sha256=body.sha256, hosts=body.hosts,
                               allow_file=token.role.covers(Role.ADMIN))
    return accepted(response, jobs)


@router.delete("/{name}", status_code=202, response_model=list[Job], responses=responses(403, 404, 503),
               summary="Remove an image no VM uses: one job per host that has it (admin of every namespace)")
def remove_image(name: PathName, response: Response, client: Client, token: ClusterAdmin) -> list[Job]:
    return accepted(response, client.remove_image(name))
