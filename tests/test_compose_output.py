"""What `msdda compose` writes (issue 20): it never removes or replaces what it did not write, an unwritable
`--out` fails before any sampling, default folders are unique per run, a folder appears only complete, and a
result that is not finite fails in one line before anything is written. Also the bound on `-n` and on the
prompts a run reads and lists."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from composition.engine import CompositionError
from tests.helpers import REPO, msdda_main


@pytest.fixture
def compose(pretrained_home, tiny_base_models, tiny_config_file, capfd):
    """Run ``msdda compose --models <the tiny base models> ... --json`` in-process: ``(exit code, stdout,
    stderr)``."""
    models = ",".join(str(folder) for folder in tiny_base_models)

    def run(*args: str) -> tuple[int, str, str]:
        compose = ["compose", "--models", models, "--config", str(tiny_config_file), "--json", "-n", "2"]
        return msdda_main([*compose, *args], capfd)

    return run


@pytest.fixture
def job(pretrained_home, tiny_config, tiny_base_models):
    """``compose_job`` on the tiny base models, 2 images, without MLflow unless asked (its store costs
    seconds)."""
    from flows.jobs import compose_job

    def run(weights: str = "0.5,0.5", **options) -> dict:
        options = {"num_images": 2, "mlflow": False, **options}
        return compose_job(
            tiny_config, pretrained_home, weights, [str(f) for f in tiny_base_models], **options
        )

    return run


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test: what must be refused before it is refused before it."""
    import composition.engine

    def generate(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(composition.engine, "generate", generate)


def one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err and "Traceback" not in err and out == "", err


def compose_runs(home: Path) -> int:
    """MLflow runs in the home's local store (none when it was never created)."""
    if not (home / "mlflow.db").exists():
        return 0
    import mlflow

    from flows.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(home))
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ never lose a file


def test_out_onto_a_folder_of_the_users_is_refused_before_sampling(compose, tmp_path, no_sampling):
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "manifest.json").write_text('{"images": []}')  # a manifest compose did not write
    before, beside = tree(folder), os.listdir(tmp_path)
    one_line_error(*compose("--weights", "0.5,0.5", "--out", str(folder)), "did not write")
    assert tree(folder) == before and os.listdir(tmp_path) == beside


def test_out_onto_a_file_is_refused_and_the_file_kept(compose, tmp_path, no_sampling):
    target = tmp_path / "result.png"
    target.write_bytes(b"the user's picture")
    beside = os.listdir(tmp_path)
    one_line_error(*compose("--weights", "0.5,0.5", "--out", str(target)), "is a file")
    assert target.read_bytes() == b"the user's picture"
    assert os.listdir(tmp_path) == beside, "no hidden .old-* copy, nothing staged"


def test_compose_replaces_only_a_folder_it_wrote(compose, job, tmp_path):
    folder = tmp_path / "samples"
    first = job(out_dir=folder, seed=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["written_by"] == "msdda compose" and manifest["seed"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "grid.png", "manifest.json"]

    second = job(out_dir=folder, seed=2)  # a folder compose wrote: replaced
    assert json.loads((folder / "manifest.json").read_text())["seed"] == 2
    assert second["image_dir"] == first["image_dir"] == str(folder.resolve())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no copy left aside"

    (folder / "my-notes.txt").write_text("added by the user")  # now it holds a file compose did not write
    before = tree(folder)
    one_line_error(*compose("--weights", "0.5,0.5", "--out", str(folder)), "did not write")
    assert tree(folder) == before


def test_staged_images_publish_only_where_they_may(tmp_path):
    """What the check found decides how the files are published: a new folder is renamed into place; an
    empty one, or compose's own, is kept and written into (the earlier compose's files it no longer lists
    removed); a user's folder or file is refused by the check, before anything is staged."""
    from composition.engine import check_image_folder, staged_images, write_images

    def publish(final: Path, images: int) -> None:
        with staged_images(check_image_folder(final)) as staged:
            write_images(torch.zeros(images, 3, 4, 4), ["a digit"] * images, staged, {"seed": images})

    users, a_file, empty, new = tmp_path / "users", tmp_path / "a-file", tmp_path / "empty", tmp_path / "new"
    users.mkdir()
    (users / "mine.txt").write_text("mine")
    a_file.write_text("mine")
    empty.mkdir()
    for final in (users, a_file):
        with pytest.raises(CompositionError):
            publish(final, 1)
    assert (users / "mine.txt").read_text() == "mine" and a_file.read_text() == "mine"
    publish(empty, 3)
    publish(new, 1)
    publish(empty, 2)  # compose's own: the third image goes with the manifest that listed it
    assert sorted(p.name for p in empty.iterdir()) == ["0000.png", "0001.png", "manifest.json"]
    assert json.loads((empty / "manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in new.iterdir()) == ["0000.png", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty", "new", "users"], "nothing staged"


def test_an_empty_folder_is_used(job, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    job(out_dir=folder)
    assert (folder / "grid.png").exists() and (folder / "0001.png").exists()


def test_an_existing_folder_is_kept_with_its_mode(job, tmp_path):
    """The images used to go into a new folder renamed over the empty one: mode 0700 became 0755."""
    folder = tmp_path / "private"
    folder.mkdir()
    folder.chmod(0o700)
    before = folder.stat()
    job(out_dir=folder, num_images=3)
    job(out_dir=folder, seed=2)  # compose's own folder: replaced in place
    after = folder.stat()
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev), "the folder itself is kept"
    assert stat.S_IMODE(after.st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "grid.png", "manifest.json"]


def test_an_empty_folder_in_a_read_only_folder_gets_the_images(job, tmp_path):
    """It used to be refused: compose staged its files beside the folder, in the read-only parent."""
    parent = tmp_path / "read-only"
    folder = parent / "images"
    folder.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        try:
            os.rmdir(tempfile.mkdtemp(dir=parent))
            pytest.skip("the mode does not bind here (root): see test_an_empty_mount_point_gets_the_images")
        except PermissionError:
            pass
        job(out_dir=folder)
    finally:
        parent.chmod(0o755)
    assert (folder / "grid.png").exists() and (folder / "0001.png").exists()


COMPOSE_SCRIPT = """
import sys
from pathlib import Path
from configs import load_config
from flows.jobs import compose_job
from training.storage import msdda_home
config, out, *models = sys.argv[1:]
options = {"num_images": 2, "out_dir": Path(out), "mlflow": False}
compose_job(load_config(config), msdda_home(), "0.5,0.5", models, **options)
"""


@pytest.mark.slow
def test_an_empty_mount_point_gets_the_images(pretrained_home, tiny_base_models, tiny_config_file, tmp_path):
    """A mount point cannot be renamed (EBUSY), even by root: publishing used to rename the staged folder
    over it, which failed after sampling. Here the folder is bind-mounted on itself in a private mount
    namespace (``unshare``), where compose runs."""
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "true"], check=False, capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("no private mount namespace (unshare -rm) here")
    folder = tmp_path / "mount-point"
    folder.mkdir()
    mounted = 'mount --bind "$1" "$1" && mountpoint -q "$1" && shift && exec "$@"'
    command = [unshare, "-rm", "sh", "-c", mounted, "sh", str(folder), sys.executable, "-c", COMPOSE_SCRIPT]
    done = subprocess.run(
        [*command, str(tiny_config_file), str(folder), *map(str, tiny_base_models)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "grid.png", "manifest.json"]


# --------------------------------------------------------------------- concurrent composes into one folder


def _publish_both(targets, images: list[int]) -> dict[int, str]:
    """Publish into both checked ``targets`` at once, from two threads, each once its files are staged:
    ``{index: "published" or the error}``."""
    from composition.engine import staged_images, write_images

    staged_both = threading.Barrier(2, timeout=60)
    outcomes: dict[int, str] = {}

    def publish(i: int) -> None:
        try:
            with staged_images(targets[i]) as staged:
                n = images[i]
                write_images(torch.full((n, 3, 4, 4), i / 2), ["a digit"] * n, staged, {"seed": 10 + i})
                staged_both.wait()
            outcomes[i] = "published"
        except CompositionError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("before", ["absent", "empty", "compose"])
def test_only_one_of_two_composes_into_one_folder_publishes(tmp_path, before):
    """Each command may replace only what was there when it checked the folder: the second to publish finds
    the first one's output there instead, keeps it, and fails in one line."""
    from composition.engine import check_image_folder, staged_images, write_images

    folder = tmp_path / "images"
    if before != "absent":
        folder.mkdir()
    if before == "compose":
        with staged_images(check_image_folder(folder)) as staged:
            write_images(torch.zeros(5, 3, 4, 4), ["a digit"] * 5, staged, {"seed": 0})
    targets = [check_image_folder(folder) for _ in range(2)]  # both check before either publishes
    outcomes = _publish_both(targets, images=[2, 3])
    winner = next(i for i, outcome in outcomes.items() if outcome == "published")
    loser = outcomes[1 - winner]
    assert "changed while this compose ran" in loser and "another --out" in loser and "\n" not in loser
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 10 + winner, "the first output is left as it was published"
    images = [f"{i:04d}.png" for i in range((2, 3)[winner])]
    assert sorted(p.name for p in folder.iterdir()) == [*images, "manifest.json"]
    assert [image["file"] for image in manifest["images"]] == images
    assert [p.name for p in tmp_path.iterdir()] == ["images"], "nothing staged is left"


def test_of_two_composes_into_one_new_out_the_second_fails(job, tmp_path, monkeypatch):
    """Both used to succeed, the second replacing the first one's images (it found a folder compose wrote).
    Two threads stand for two commands; they take turns loading the models (loading is not thread-safe)."""
    import composition.engine

    load, sample = composition.engine.load_ensemble, composition.engine.generate
    one_loader, both_checked = threading.Lock(), threading.Barrier(2, timeout=300)

    def load_ensemble(*args, **kwargs):
        with one_loader:
            return load(*args, **kwargs)

    def generate(*args, **kwargs):
        both_checked.wait()  # the folder is checked before loading: by now both commands found it absent
        return sample(*args, **kwargs)

    monkeypatch.setattr(composition.engine, "load_ensemble", load_ensemble)
    monkeypatch.setattr(composition.engine, "generate", generate)
    folder = tmp_path / "images"
    outcomes: dict[int, object] = {}

    def compose(seed: int) -> None:
        try:
            outcomes[seed] = job(out_dir=folder, seed=seed)
        except CompositionError as exc:
            outcomes[seed] = exc
        finally:
            if seed not in outcomes:  # failed otherwise: the other thread need not wait
                both_checked.abort()

    threads = [threading.Thread(target=compose, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [seed for seed, outcome in outcomes.items() if isinstance(outcome, CompositionError)]
    assert len(failed) == 1 and len(outcomes) == 2, outcomes
    assert "changed while this compose ran" in str(outcomes[failed[0]])
    assert json.loads((folder / "manifest.json").read_text())["seed"] == 3 - failed[0]


# ------------------------------------------------------------------------- unwritable --out, before sampling


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: mode 0555, or for root (who ignores modes) a sysfs folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if sys.platform.startswith("linux") and Path("/sys/kernel").is_dir():
        return Path("/sys/kernel")
    pytest.skip("no folder that root cannot write")


@pytest.mark.parametrize("case", ["read-only", "under a file", "dot", "dot-dot"])
def test_unwritable_out_fails_in_one_line_before_sampling(compose, tmp_path, monkeypatch, no_sampling, case):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path / "msdda_home")
    out = {
        "read-only": lambda: str(_read_only_folder(tmp_path) / "images"),
        "under a file": lambda: str(tmp_path / "a-file" / "images"),
        "dot": lambda: ".",
        "dot-dot": lambda: "..",
    }[case]()
    message = {
        "read-only": "cannot write the image folder",
        "under a file": "is a file",
        "dot": "is the current folder or one above it",
        "dot-dot": "is the current folder or one above it",
    }[case]
    one_line_error(*compose("--weights", "0.5,0.5", "--out", out), message)
    assert (tmp_path / "a-file").read_text() == "x"
    if case == "read-only" and os.geteuid() != 0:
        (tmp_path / "read-only").chmod(0o755)


# ---------------------------------------------------------------------------------- unique, published last


def test_default_folders_are_unique_per_run(pretrained_home, job):
    from flows.jobs import composition_folder_name

    names = {composition_folder_name("msdda", [0.5, 0.5], 0) for _ in range(50)}  # the same second
    assert len(names) == 50
    first, second = job(), job()  # the same settings, most often the same second
    assert first["image_dir"] != second["image_dir"]
    for result in (first, second):
        folder = Path(result["image_dir"])
        assert folder.parent == pretrained_home / "compositions"
        assert sorted(p.name for p in folder.iterdir()) == [
            "0000.png",
            "0001.png",
            "grid.png",
            "manifest.json",
        ]


def test_a_folder_appears_only_complete(pretrained_home, job, tmp_path, monkeypatch):
    """A compose that dies after its images are written but before the grid publishes nothing and logs no
    run (the folder is renamed into place when images, manifest and grid are all there)."""
    import composition.evaluation

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill at this point leaves behind

    monkeypatch.setattr(composition.evaluation, "image_grid", killed)
    out = tmp_path / "images"
    with pytest.raises(KeyboardInterrupt):
        job(out_dir=out, mlflow=True)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".images-")], "the staged one is removed"
    assert compose_runs(pretrained_home) == 0


# ---------------------------------------------------------------------------------------- non-finite results


@pytest.mark.parametrize("method", ["db", "rs", "rgg"])
def test_a_result_that_is_not_finite_fails_before_anything_is_written(
    compose, pretrained_home, tmp_path, method
):
    out = tmp_path / "images"
    one_line_error(*compose("--weights", "1e30,1e30", "--method", method, "--out", str(out)), "not finite")
    assert not out.exists() and not (pretrained_home / "compositions").exists()
    assert compose_runs(pretrained_home) == 0


def test_the_finite_check_stops_at_the_first_composed_step(pretrained_home, tiny_config, tiny_base_models):
    from composition.engine import generate, load_ensemble

    ensemble = load_ensemble(tiny_config, pretrained_home, tiny_base_models)
    with pytest.raises(CompositionError, match=r"composed step \d is not finite"):
        generate(ensemble, "db", [1e30, 1e30], tiny_config.composition, num_images=2)


# ----------------------------------------------------------------------------------------- bounded work


def test_num_images_is_bounded_on_compose_and_sweep(compose, tiny_config_file, capfd, no_sampling):
    from flows.cli import main
    from flows.jobs import MAX_IMAGES

    one_line_error(
        *compose("--weights", "0.5,0.5", "-n", "1000000000"), f"less than or equal to {MAX_IMAGES}"
    )
    capfd.readouterr()
    code = main(["sweep", "-n", str(MAX_IMAGES + 1), "--config", str(tiny_config_file), "--json"])
    out, err = capfd.readouterr()
    assert code == 2 and f"less than or equal to {MAX_IMAGES}" in err and err.count("\n") == 1, err
    # the config's composition.num_images is held to the same bound
    code = main(
        ["compose", "--weights", "0.5,0.5", "--config", str(tiny_config_file), "--json"]
        + ["--set", f"composition.num_images={MAX_IMAGES + 1}"]
    )
    out, err = capfd.readouterr()
    one_line_error(code, out, err, f"at most {MAX_IMAGES} per run")


def test_only_the_prompts_used_are_read_and_listed(job, tmp_path):
    from flows.jobs import MAX_IMAGES, read_prompts

    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a handwritten digit {digits[i % 10]}\n\n" for i in range(3 * MAX_IMAGES)))
    assert len(read_prompts(prompts)) == MAX_IMAGES and len(read_prompts(prompts, limit=3)) == 3
    payload = job(num_images=3, prompts=read_prompts(prompts))
    assert payload["prompts"] == [f"a handwritten digit {d}" for d in digits[:3]]
    manifest = json.loads((Path(payload["image_dir"]) / "manifest.json").read_text())
    assert [image["prompt"] for image in manifest["images"]] == payload["prompts"]
    assert len(json.dumps(payload)) < 5000


def test_fewer_prompts_than_images_still_cycle(job):
    payload = job(num_images=3, prompts=["a handwritten digit one", "digit two"])
    assert payload["prompts"] == ["a handwritten digit one", "digit two"]
    manifest = json.loads((Path(payload["image_dir"]) / "manifest.json").read_text())
    assert [image["prompt"] for image in manifest["images"]] == [*payload["prompts"], payload["prompts"][0]]
