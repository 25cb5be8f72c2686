"""Stage model weights into the store, so clusters without hub access load them from MinIO.

``vidalign models pull NAME --out URI`` copies each weight source of a
registry entry (a teacher's SD1.5 pipeline and motion adapter, a student's
VideoLLM checkpoint, MotionEnhancer's CogVideoX pipeline) into the store as one
artifact per component: ``URI/base``, ``URI/motion_adapter``, ``URI/model``,
``URI/pipeline``. The sources come from the Hugging Face hub
(``huggingface_hub.snapshot_download``) or, where the hub is out of reach, from
local directories (``--from DIR`` with one subdirectory per component), or from
a store where an earlier pull staged them (``--from URI``: each component is
fetched verified by sha256, so ``--out DIR`` gives a local copy).
``vidalign teacher serve --teacher-model NAME --weights URI`` and the trainers'
``student_weights`` then load from there, verified by sha256; ``vidalign priors
extract --teacher-model`` takes the local copy of ``pipeline`` (a CogVideoX
pipeline directory).
"""

from __future__ import annotations

from pathlib import Path

from vidalign.errors import InvalidInput, NotFound, Unavailable
from vidalign.log import get_logger
from vidalign.store import (
    commit_artifact,
    is_store_uri,
    materialize,
    open_store,
    read_manifest,
    split_uri,
)
from vidalign.students import STUDENT_MODELS
from vidalign.vda import TEACHER_MODELS

log = get_logger(__name__)


def weight_sources(name: str) -> dict[str, str]:
    """component -> HF id (or local dir) of a registry entry's weights."""
    from vidalign.motionenhancer import COGVIDEOX_MODELS  # imports diffusers: only when asked

    if name in TEACHER_MODELS:
        spec = TEACHER_MODELS[name]
        sources = {"base": spec.base, "motion_adapter": spec.motion_adapter}
    elif name in STUDENT_MODELS:
        sources = {"model": STUDENT_MODELS[name].hf_id}
    elif name in COGVIDEOX_MODELS:
        sources = {"pipeline": COGVIDEOX_MODELS[name].repo}
    else:
        known = ", ".join([*TEACHER_MODELS, *COGVIDEOX_MODELS, *STUDENT_MODELS])
        raise NotFound(f"model '{name}' is not in the registry (known: {known})")
    sources = {k: v for k, v in sources.items() if v}
    if not sources:
        raise InvalidInput(f"model '{name}' is a random-init preset: it has no weights to pull")
    return sources


def _snapshot(repo_id: str) -> Path:
    if Path(repo_id).is_dir():
        return Path(repo_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, gated, unknown id: all end the same way for the user
        raise Unavailable(
            f"cannot download {repo_id} from the Hugging Face hub ({type(err).__name__}: {err}); "
            "where the hub is out of reach, stage local copies with --from DIR"
        ) from None


def _staged_files(uri: str, name: str, component: str) -> dict[str, Path]:
    """The files of the artifact ``uri`` (a component an earlier pull committed), fetched and
    verified; exactly those its manifest lists."""
    manifest = read_manifest(*split_uri(uri))
    if manifest is None:
        raise NotFound(f"{uri}: no staged {component} of {name} (no committed artifact there)")
    local = materialize(uri)
    return {rel: local / rel for rel in sorted(manifest.files)}


def pull(name: str, to: str, *, source_dir: str | None = None) -> dict[str, str]:
    """Commit every weight component of ``name`` under ``to``; returns component -> URI.

    ``source_dir``: a local directory with one subdirectory per component, or a store URI
    under which an earlier pull committed them; None: the Hugging Face hub.
    """
    store = open_store(to)
    staged = {}
    for component, source in weight_sources(name).items():
        if source_dir and is_store_uri(source_dir):
            files = _staged_files(f"{source_dir.rstrip('/')}/{component}", name, component)
            local = None
        else:
            local = Path(source_dir) / component if source_dir else _snapshot(source)
            if not local.is_dir():
                raise NotFound(f"{local}: expected a directory with the {component} of {name}")
            files = {
                p.relative_to(local).as_posix(): p
                for p in sorted(local.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
            }
        if not files:
            raise InvalidInput(f"{local or source_dir}: no files to stage for the {component} of {name}")
        commit_artifact(store, component, files, producer="vidalign models pull",
                        meta={"model": name, "component": component, "source": str(source_dir or source)})
        staged[component] = f"{store.uri.rstrip('/')}/{component}"
        log.info("model_component_staged", model=name, component=component, uri=staged[component],
                 files=len(files))
    return staged


def weights_component(weights: str, component: str) -> str | None:
    """The local directory of ``component`` under a ``--weights`` URI, or None if absent."""
    uri = f"{weights.rstrip('/')}/{component}"
    try:
        return str(materialize(uri)) if "://" in weights else (uri if Path(uri).is_dir() else None)
    except NotFound:
        return None
