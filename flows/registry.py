"""The MLflow model registry layer: base-model folders in, registered model versions with lineage tags out.

Every base model (a folder written by :func:`training.card.save_base_model`) becomes a version of the
registered model ``msdda-<objective>``. Its files are logged as artifacts (under ``base_model``) of an MLflow
run; its version tags carry the lineage (objective, reward spec, beta, trainer, reference hash, scheduler and
sampling config, metrics, git sha, and the content hash of the files). The alias ``champion`` marks the
version to compose.

Specs name a version: ``NAME`` (= ``NAME@champion``), ``NAME@ALIAS`` or ``NAME/VERSION``, where ``NAME`` is
the registered name or just the objective. :func:`resolve` downloads a version once into
``$MSDDA_HOME/registry_cache/<name>/<version>`` and checks its content hash every time it is used.

With the default SQLite store, writers on one machine are serialised by a file lock next to the database and
"database is locked" errors are retried with backoff (for at most :data:`RETRY_SECONDS`); every public
function first checks, within seconds, that the store can be used (:func:`check_reachable`): a tracking server
(``MLFLOW_TRACKING_URI=http...``) answers, a SQLite file is an intact database. A server that stops answering
later, or a corrupt file, is one line too (:class:`~flows.tracking.TrackingError`). Listing an empty home's
store that does not exist yet creates nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.errors import MsddaError, first_line
from configs.schema import TrainConfig
from flows.failures import SQLITE_LOCKED
from flows.tracking import (
    check_store,
    ensure_experiment,
    is_remote,
    local_store,
    mlflow_client,
    process_tags,
    store_errors,
    store_failure,
    store_lock,
    tracking_uri,
)
from training.card import CARD_FILE, BaseModelCard

MODEL_PREFIX = "msdda-"
CHAMPION = "champion"
ARTIFACT_PATH = "base_model"
LINEAGE_JSON_KEYS = ("reward", "reward_scale", "scheduler", "sampling")
LINEAGE_KEYS = ("objective", "beta", "trainer", "reference_hash")
METRIC_KEYS = (
    "reward_before",
    "reward_after",
    "reward_se",
    "rise_in_se",
    "kl",
    "kernel_error",
    "kernel_cosine",
)
RUN_HASH_TAG = "msdda.base_model.content_hash"
CHAMPION_MIN_RISE_SE = 3.0
"""The ``champion`` alias's bound on the held-out reward's rise, in paired standard errors: a version takes
the alias only when its reward rose by more than this (:func:`champion_verdict`)."""
CHAMPION_REASON_TAG = "champion_reason"
"""Version tag: why the version did or did not take ``champion`` (:func:`champion_verdict`)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TRANSIENT = (*SQLITE_LOCKED, "Giving up after")
RETRY_SECONDS = 60.0
"""How long :func:`_retrying` keeps retrying a locked store before it gives up."""


class RegistryError(MsddaError, ValueError):
    """One-line, user-facing registry problem (unknown model/alias/version, unreachable server, corrupt
    model)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base-model folder and, when it came from the registry, the registered name and version it holds."""

    path: Path
    name: str | None = None
    version: int | None = None


# --------------------------------------------------------------------------------------------------- plumbing


def registered_name(objective: str) -> str:
    """The registered model holding the base models of ``objective``."""
    return objective if objective.startswith(MODEL_PREFIX) else MODEL_PREFIX + objective


def _checked_name(name: str) -> str:
    """``name`` itself, refused unless it is a plain identifier (it goes into MLflow filter strings)."""
    if not _NAME.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def check_reachable(home: Path) -> None:
    """Fail within seconds, in one line, if the store cannot be used: a :class:`RegistryError` if the
    tracking server (``http(s)://``) does not answer, a :class:`~flows.tracking.TrackingError` if the SQLite
    file is corrupt (:func:`~flows.tracking.check_store`). Changes nothing.
    """
    uri = tracking_uri(home)
    if not is_remote(uri):
        check_store(home)
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy may refuse /health): reachable; MLflow reports anything else
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise RegistryError(f"MLflow tracking server at {uri} is unreachable: {reason}") from None


@contextmanager
def _registry_errors(home: Path, what: str) -> Iterator[None]:
    """Turn MLflow's (often multi-line) exceptions into one line: a store that cannot be used is a
    :class:`~flows.tracking.TrackingError` (:func:`~flows.tracking.store_errors`), anything else MLflow
    refuses a :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        with store_errors(home, what):
            yield
    except MlflowException as exc:
        raise RegistryError(f"{what} failed: {first_line(exc)}") from exc


def _retrying(
    call: Callable[..., Any], home: Path, attempts: int = 10, first_delay: float = 0.05
) -> Callable[..., Any]:
    """``call`` retried with exponential backoff and jitter while SQLite reports a lock, for at most
    :data:`RETRY_SECONDS`; never when the store cannot be used (MLflow already retried the request)."""

    def wrapper(*args, **kwargs):
        deadline = time.monotonic() + RETRY_SECONDS
        for attempt in range(attempts):
            try:
                return call(*args, **kwargs)
            except Exception as exc:  # MlflowException or a raw sqlalchemy OperationalError
                delay = first_delay * 2**attempt * (0.5 + random.random())
                if (
                    attempt == attempts - 1
                    or not any(text in str(exc) for text in _TRANSIENT)
                    or store_failure(home, "", exc) is not None
                    or time.monotonic() + delay > deadline
                ):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


class _Client:
    """An ``MlflowClient`` for ``home``'s tracking URI whose calls retry on SQLite lock errors."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.client = mlflow_client(home)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return _retrying(getattr(self.client, name), self.home)


def _client(home: Path) -> _Client:
    """A retrying client, with the store created (schema migrations run) under the writer lock."""
    check_reachable(home)
    with store_lock(home), _registry_errors(home, "opening the MLflow store"):
        client = _Client(home)  # MlflowClient creates the store, and migrates a new SQLite database, here
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


def _paged(call: Callable[..., Any], **kwargs) -> list:
    """Every item of a paged MLflow search."""
    items, token = [], None
    while True:
        page = call(page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _git_sha() -> str:
    """HEAD of the repository this code runs from, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ registering


def _content_hash(folder: Path) -> str:
    from training.storage import content_hash

    return content_hash(folder)


def lineage_tags(card: BaseModelCard, content_hash: str) -> dict[str, str]:
    """The version tags of a base model with card ``card``."""
    data = card.model_dump(mode="json", fallback=str)
    tags = {key: str(data[key]) for key in LINEAGE_KEYS}
    tags.update({key: json.dumps(data[key], sort_keys=True) for key in LINEAGE_JSON_KEYS})
    tags.update({key: str(card.metrics.get(key, "nan")) for key in METRIC_KEYS})
    tags["format_version"] = str(card.format_version)
    tags["git_sha"] = _git_sha()
    tags["content_hash"] = content_hash
    return tags


def champion_verdict(card: BaseModelCard, min_rise_se: float = CHAMPION_MIN_RISE_SE) -> tuple[bool, str]:
    """Whether a base model earns ``champion`` by its card, and why.

    Two checks: the held-out reward rose by more than ``min_rise_se`` paired SE; and, when training ran the
    held-out kernel check (``train.eval_every``, :mod:`training.step.kernel_check`), its path error is at most
    ``train.max_kernel_error``. A check that was configured but could not run fails the second; a model
    trained without it is judged by the reward alone (and its verdict says so)."""
    metrics = card.metrics
    rise = _float(metrics.get("rise_in_se"))
    if math.isnan(rise) or rise <= min_rise_se:
        return False, f"the reward did not rise by more than {min_rise_se:g} SE"
    reward = f"the reward rose by more than {min_rise_se:g} SE"
    check = str(metrics.get("kernel_check", "off"))
    if check == "off":
        return True, f"{reward} (no kernel check: train.eval_every was 0)"
    if check.startswith("missing"):
        return False, f"the kernel check is {check}"
    error = _float(metrics.get("kernel_error"))
    bound = _float(card.train.get("max_kernel_error", TrainConfig.model_fields["max_kernel_error"].default))
    if not error <= bound:  # NaN fails too
        return False, f"kernel error {error:.3f} > {bound:g} ({check} check)"
    return True, f"{reward} and kernel error {error:.3f} <= {bound:g} ({check} check)"


def version_description(card: BaseModelCard, champion: bool, forced: bool, reason: str) -> str:
    """The model version's description: the held-out metrics, and why it did or did not take ``champion``
    (``reason``, from :func:`champion_verdict` unless ``forced``).

    E.g. ``ink_economy base model (beta 0.01, target_matching): held-out reward -0.2996 -> -0.2564 (rise
    +75.0 SE, paired SE 0.00058); KL/step 0.2210; kernel error 0.312, cosine 0.951. champion: the reward rose
    by more than 3 SE and kernel error 0.312 <= 1 (exact check).``
    """
    metrics = card.metrics

    def number(key: str, spec: str) -> str:
        value = _float(metrics.get(key))
        return "n/a" if math.isnan(value) else format(value, spec)

    text = (
        f"{card.objective} base model (beta {card.beta:g}, {card.trainer}): held-out reward "
        f"{number('reward_before', '.4f')} -> {number('reward_after', '.4f')} "
        f"(rise {number('rise_in_se', '+.1f')} SE, paired SE {number('reward_se', '.2g')}); "
        f"KL/step {number('kl', '.4f')}"
    )
    if not math.isnan(_float(metrics.get("kernel_error"))):
        text += f"; kernel error {number('kernel_error', '.3f')}, cosine {number('kernel_cosine', '.3f')}"
    verdict = "champion" if champion else "not champion"
    return f"{text}. {verdict}: {'set explicitly' if forced else reason}."


def _is_champion(card: BaseModelCard, champion: bool | None, min_rise_se: float) -> tuple[bool, str]:
    if champion is not None:
        return champion, "set explicitly"
    return champion_verdict(card, min_rise_se)


def _finite_or_none(value: Any) -> float | None:
    number = _float(value)
    return number if math.isfinite(number) else None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ensure_registered_model(client: _Client, name: str, objective: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name,
            tags={"objective": objective},
            description=f"msdda base models (LoRA + variance safetensors) for the objective {objective!r}",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a concurrent creator won
            raise


def _versions(client: _Client, name: str) -> list:
    return sorted(
        _paged(client.search_model_versions, filter_string=f"name='{name}'"), key=lambda v: int(v.version)
    )


def _existing_version(client: _Client, name: str, content_hash: str):
    """The earliest version of ``name`` holding exactly these files, if any."""
    for version in _versions(client, name):
        if version.tags.get("content_hash") == content_hash:
            return version
    return None


def _log_files(
    client: _Client,
    home: Path,
    model_dir: Path,
    objective: str,
    run_id: str | None,
    card: BaseModelCard,
    content_hash: str,
) -> tuple[str, str]:
    """Log the folder's files to ``run_id`` (a new run if ``None``); returns ``(run_id, artifact_uri)``."""
    artifact_path = ARTIFACT_PATH
    if run_id is None:
        experiment_id = ensure_experiment(client, home)
        run = client.create_run(
            experiment_id,
            run_name=f"register-{objective}",
            tags={"msdda.kind": "register", "msdda.objective": objective, **process_tags()},
        )
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=_run_metrics(card))
    else:
        logged = client.get_run(run_id).data.tags.get(RUN_HASH_TAG)
        if logged and logged != content_hash:  # this run already holds another base model: keep both
            artifact_path = f"{ARTIFACT_PATH}-{content_hash[:12]}"
    client.log_artifacts(run_id, str(model_dir), artifact_path)
    if artifact_path == ARTIFACT_PATH:
        client.set_tag(run_id, RUN_HASH_TAG, content_hash)
    return run_id, f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def _run_metrics(card: BaseModelCard) -> list:
    """The finite numeric metrics of the card as MLflow metrics."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {k: _float(v) for k, v in card.metrics.items() if not isinstance(v, str)}
    return [Metric(k, v, now, 0) for k, v in values.items() if math.isfinite(v)]


def _version_dict(version) -> dict:
    tags = version.tags
    return {
        "name": version.name,
        "version": int(version.version),
        "aliases": sorted(getattr(version, "aliases", []) or []),
        "objective": tags.get("objective", version.name.removeprefix(MODEL_PREFIX)),
        "reward_after": _float(tags.get("reward_after")),
        "reward_se": _float(tags.get("reward_se")),
        "rise_in_se": _float(tags.get("rise_in_se")),
        "kernel_error": _finite_or_none(tags.get("kernel_error")),
        "champion_reason": tags.get(CHAMPION_REASON_TAG, ""),
        "beta": _float(tags.get("beta")),
        "reference_hash": tags.get("reference_hash", ""),
        "content_hash": tags.get("content_hash", ""),
        "run_id": version.run_id,
        "source": version.source,
    }


def register_base_model(
    home: Path,
    model_dir: Path,
    run_id: str | None = None,
    champion: bool | None = None,
    min_rise_se: float = CHAMPION_MIN_RISE_SE,
) -> dict:
    """Register the base model in ``model_dir`` as a new version of ``msdda-<objective>``.

    Its files are logged as artifacts (under ``base_model``) of run ``run_id``, or of a new run in the
    ``msdda`` experiment. The version's tags carry its lineage (see :func:`lineage_tags`). The alias
    ``champion`` moves to it when ``champion`` is true, or when ``champion`` is ``None`` and it passes
    :func:`champion_verdict` (reward rise above ``min_rise_se``, kernel check within its bound). A folder
    whose content hash is already registered is not registered again: that version is returned (with
    ``created`` false), and it only takes the alias when ``champion`` is explicitly true. The version's
    description states its held-out metrics and why it did or did not take the alias
    (:func:`version_description`).

    Returns ``{"name", "version", "aliases", "run_id", "source", "content_hash", "objective", "champion",
    "created", ...}``.
    """
    model_dir = Path(model_dir)
    card = BaseModelCard.read(model_dir)
    objective = card.objective
    name = _checked_name(registered_name(objective))
    digest = _content_hash(model_dir)
    client = _client(home)
    with store_lock(home), _registry_errors(home, f"registering {model_dir}"):
        _ensure_registered_model(client, name, objective)
        existing = _existing_version(client, name, digest)
        created = existing is None
        if created:
            new_run = run_id is None
            make_champion, reason = _is_champion(card, champion, min_rise_se)
            run_id, source = _log_files(client, home, model_dir, objective, run_id, card, digest)
            version = client.create_model_version(
                name,
                source,
                run_id=run_id,
                tags={**lineage_tags(card, digest), CHAMPION_REASON_TAG: reason},
                description=version_description(card, make_champion, champion is not None, reason),
            )
            if new_run:
                client.set_terminated(run_id)
        else:
            version, make_champion = existing, champion is True
        if make_champion:
            client.set_registered_model_alias(name, CHAMPION, version.version)
        version = client.get_model_version(name, version.version)
    return {**_version_dict(version), "champion": CHAMPION in (version.aliases or []), "created": created}


# -------------------------------------------------------------------------------------------------- listing


def list_models(home: Path) -> list[dict]:
    """One dict per version of every ``msdda-*`` registered model, sorted by name and version.

    Keys: name, version, aliases, objective, reward_after, reward_se, rise_in_se, kernel_error (``None``
    without a kernel check), champion_reason, beta, reference_hash, content_hash, run_id, source. A local
    store that does not exist yet holds none (and is not created).
    """
    database = local_store(home)
    if database is not None and not database.exists():
        return []
    client = _client(home)
    with _registry_errors(home, "listing registered models"):
        models = _paged(client.search_registered_models, filter_string=f"name LIKE '{MODEL_PREFIX}%'")
        rows = []
        for model in models:
            if model.name.startswith(MODEL_PREFIX):
                aliases = _aliases_by_version(model)
                for version in _versions(client, model.name):
                    row = _version_dict(version)
                    row["aliases"] = sorted(set(row["aliases"]) | aliases.get(row["version"], set()))
                    rows.append(row)
    return sorted(rows, key=lambda row: (row["name"], row["version"]))


def _aliases_by_version(model) -> dict[int, set[str]]:
    """``{version: {alias, ...}}`` of a registered model entity."""
    out: dict[int, set[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        out.setdefault(int(version), set()).add(alias)
    return out


# ------------------------------------------------------------------------------------------------ resolving


def parse_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``(registered name, alias, version)`` of a spec; exactly one of alias and version is set."""
    text = spec.strip().removeprefix("models:/")
    if "@" in text:
        name, alias = text.split("@", 1)
        if not alias:
            raise RegistryError(f"invalid model spec {spec!r}: empty alias after '@'")
        return _checked_name(registered_name(name)), alias, None
    if "/" in text:
        name, version = text.rsplit("/", 1)
        if not version.isdigit():
            raise RegistryError(f"invalid model spec {spec!r}: expected NAME, NAME@ALIAS or NAME/VERSION")
        return _checked_name(registered_name(name)), None, int(version)
    return _checked_name(registered_name(text)), CHAMPION, None


def _model_version(client: _Client, spec: str):
    """The model version entity a spec names; unknown names, aliases and versions are one-line errors."""
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_spec(spec)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [
            m.name
            for m in _paged(client.search_registered_models, filter_string=f"name LIKE '{MODEL_PREFIX}%'")
        ]
        raise RegistryError(
            f"unknown model {name!r}; registered: {', '.join(sorted(known)) or 'none'}"
        ) from None
    versions = [int(v.version) for v in _versions(client, name)]
    if alias is not None:
        aliases = getattr(model, "aliases", None) or {}
        if alias not in aliases:
            listed = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"model {name!r} has no alias {alias!r}; aliases: {listed}; "
                f"versions: {', '.join(map(str, versions)) or 'none'}"
            )
        number = int(aliases[alias])
    if number not in versions:
        raise RegistryError(
            f"model {name!r} has no version {number}; versions: {', '.join(map(str, versions)) or 'none'}"
        )
    return client.get_model_version(name, str(number))


def _base_model_folder(root: Path) -> Path | None:
    """The folder under ``root`` (itself included) holding a base-model card."""
    if (root / CARD_FILE).is_file():
        return root
    found = sorted(root.rglob(CARD_FILE))
    return found[0].parent if found else None


def _intact(root: Path, expected_hash: str) -> bool:
    """Whether ``root`` holds a base model whose content hash is ``expected_hash`` (if that is known)."""
    folder = _base_model_folder(root) if root.is_dir() else None
    if folder is None:
        return False
    return not expected_hash or _content_hash(folder) == expected_hash


def _discard(path: Path) -> None:
    """Remove ``path`` by first renaming it aside, so nobody sees it half-deleted."""
    if not path.exists():
        return
    aside = path.with_name(f".trash-{path.name}-{os.getpid()}-{random.randrange(1 << 30)}")
    try:
        os.rename(path, aside)
    except OSError:
        return  # someone else replaced or removed it
    shutil.rmtree(aside, ignore_errors=True)


def _download(home: Path, version, target: Path) -> None:
    """Download ``version``'s artifacts to ``target`` (through a temporary folder and a rename)."""
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:  # scratch, removed after
        with _registry_errors(home, f"downloading {version.name} v{version.version}"):
            uri = tracking_uri(home)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=version.source,
                dst_path=tmp,
                tracking_uri=uri,
                registry_uri=uri,
            )
        folder = _base_model_folder(Path(local))
        if folder is None:
            raise RegistryError(
                f"model {version.name} v{version.version} is corrupt: no {CARD_FILE} "
                f"in its artifacts at {version.source}"
            )
        if not _intact(folder, version.tags.get("content_hash", "")):
            raise RegistryError(
                f"model {version.name} v{version.version} is corrupt: its artifacts at "
                f"{version.source} do not match the registered content hash"
            )
        _discard(target)  # a stale or corrupt copy
        try:
            os.rename(folder, target)
        except OSError:
            if not _intact(target, version.tags.get("content_hash", "")):  # a concurrent download won?
                raise


def resolve(home: Path, spec: str) -> ResolvedModel:
    """The local folder (holding the base-model card) of the version ``spec`` names, with that version's
    registered name and number; see :func:`parse_spec`.

    The version is downloaded once to ``$MSDDA_HOME/registry_cache/<name>/<version>``; a cached copy whose
    content hash differs from the registered one (truncated, edited, or from another server) is replaced.
    """
    client = _client(home)
    with _registry_errors(home, f"resolving {spec!r}"):
        version = _model_version(client, spec)
    target = home / "registry_cache" / version.name / str(version.version)
    if not _intact(target, version.tags.get("content_hash", "")):
        _download(home, version, target)
    folder = _base_model_folder(target)
    assert folder is not None
    return ResolvedModel(folder, version.name, int(version.version))
