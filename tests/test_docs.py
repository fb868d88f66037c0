"""The README and docs/ held to the code: the README's two quickstarts and the Python examples of
docs/getting-started.md run (on the tiny model), every `msdda` and benchmark command written in them uses
options that exist, every YAML block is a valid config, every relative link and anchor resolves, and each
generated block (``<!-- NAME:start -->``) lives in exactly one file, where ``--write-readme`` writes it."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)

# ------------------------------------------------------------------------------------------------- helpers


def code_blocks(path: Path, language: str | None = None) -> list[str]:
    """The fenced code blocks of ``path`` (of one language), dedented."""
    blocks = []
    for match in CODE_BLOCK.finditer(path.read_text()):
        if language is None or match.group(2) == language:
            indent = len(match.group(1))
            blocks.append("\n".join(line[indent:] for line in match.group(3).splitlines()))
    return blocks


def section(path: Path, heading: str) -> str:
    """The text of ``path`` under the heading ``heading`` (up to the next heading of any level)."""
    text = CODE_BLOCK.sub(lambda m: m.group(0).replace("#", "\0"), path.read_text())  # code is no heading
    parts = re.split(r"^#+ (.*)$", text, flags=re.MULTILINE)
    bodies = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    assert heading in bodies, f"{path.name} has no heading '{heading}': {list(bodies)}"
    return bodies[heading].replace("\0", "#")


def commands_of(block: str) -> list[list[str]]:
    """The `msdda` command lines of a bash block, as argument lists (comments dropped)."""
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [tokens[1:] for tokens in lines if tokens and tokens[0] == "msdda"]


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def readme_section():
    """``benchmarks/readme_section.py``, the module every benchmark's ``--write-readme`` calls."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("readme_section")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


# ------------------------------------------------------------------------------------------ shape and links


def test_the_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first_code = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    assert first_code < 70, "the Python quickstart starts within the first 70 lines"
    assert "<!--" not in README.read_text(), "generated blocks live in docs/, not in the README"


def test_no_issue_numbers_or_private_references():
    for path in DOCS:
        text = path.read_text()
        found = re.findall(r"\bissues? *#?\d+|\bPR *#\d+", text, flags=re.IGNORECASE)
        assert not found, f"{path.name}: {found}"


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        text = CODE_BLOCK.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -------------------------------------------------------------------------------------- generated blocks

RESULTS_BLOCKS = {
    "sample-efficiency",
    "composition-results",
    "step-optimality",
    "step-optimality-exact",
    "step-profile",
    "step-proposal",
}
PERFORMANCE_BLOCKS = {"compose-speed", "compose-speed-sd15", "compose-speed-sd15-h100"}


def test_each_generated_block_lives_in_one_file():
    module = readme_section()
    starts: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text()
        for name in re.findall(r"<!-- ([a-z0-9-]+):start -->", text):  # `<!-- NAME:start -->` is prose
            starts.setdefault(name, []).append(path.name)
            assert text.count(f"<!-- {name}:end -->") == 1, f"{path.name}: {name} has no single end marker"
    assert all(len(files) == 1 for files in starts.values()), starts
    assert {n for n, f in starts.items() if f == ["results.md"]} >= RESULTS_BLOCKS
    assert {n for n, f in starts.items() if f == ["performance.md"]} >= PERFORMANCE_BLOCKS
    assert starts["threads-under-load"] == ["operations.md"]
    assert starts["trainer-ablation"] == starts["fit-ceiling"] == ["design.md"]
    for name, (file,) in starts.items():
        assert module.find_section(name).name == file


def test_write_section_writes_into_the_file_that_holds_the_markers(tmp_path, monkeypatch):
    module = readme_section()
    docs = tmp_path / "docs"
    docs.mkdir()
    for path in DOCS:
        (docs / path.name).write_text(path.read_text())
    documents = tuple(docs / p.name for p in module.DOCUMENTS)
    monkeypatch.setattr(module, "DOCUMENTS", documents)
    monkeypatch.setattr(module, "RESULTS", docs / "results.md")

    written = module.write_section("compose-speed", "| new | table |")
    assert written == docs / "performance.md"
    text = written.read_text()
    assert "<!-- compose-speed:start -->\n| new | table |\n<!-- compose-speed:end -->" in text
    assert text.count("compose-speed:start") == 1
    assert "floor: plain UNet" not in text.split("compose-speed:start")[1].split("compose-speed:end")[0]
    originals = {path.name: path.read_text() for path in DOCS}
    assert all(p.read_text() == originals[p.name] for p in documents if p != written), "no other file changes"

    assert module.write_section("a-new-block", "text") == docs / "results.md"
    appended = "<!-- a-new-block:start -->\ntext\n<!-- a-new-block:end -->\n"
    assert (docs / "results.md").read_text().endswith(appended)
    assert module.write_section("trainer-ablation", "x", target=docs / "design.md") == docs / "design.md"

    (docs / "cli.md").write_text("<!-- step-profile:start -->\n<!-- step-profile:end -->\n")
    monkeypatch.setattr(module, "DOCUMENTS", (*documents, docs / "cli.md"))
    with pytest.raises(ValueError, match="'step-profile' are in several files"):
        module.write_section("step-profile", "x")


# ------------------------------------------------------------------------------ commands written in the docs


def _app():
    import typer

    from flows.cli import app

    return typer.main.get_command(app)


def _options(command) -> set[str]:
    return {"--help"} | {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _written_commands() -> list[tuple[str, list[str]]]:
    """Every `msdda ...` command in the README and docs/: bash block lines and inline code spans, as
    ``(where, tokens after msdda)``; `python -m flows.cli` and `.venv/bin/msdda` count too."""
    found = []
    for path in DOCS:
        text = path.read_text()
        spans = [line for block in code_blocks(path, "bash") for line in block.splitlines()]
        spans += re.findall(r"`([^`]+)`", CODE_BLOCK.sub("", text))
        for span in spans:
            try:
                tokens = shlex.split(span.replace("\n", " "), comments=True)
            except ValueError:
                tokens = span.split()
            for i, token in enumerate(tokens):
                if token == "msdda" or token.endswith("/msdda") or token == "flows.cli":
                    found.append((f"{path.name}: {span.strip()[:80]}", tokens[i + 1 :]))
                    break
    return found


def test_every_written_msdda_command_uses_real_options():
    """Each option written after `msdda COMMAND` is one of COMMAND's (or the program's)."""
    app = _app()
    problems, checked = [], 0
    for where, tokens in _written_commands():
        commands, options = [], []
        for token in tokens:
            token = token.strip("[]")
            if token in ("&&", ";") or token.startswith("'"):
                break
            if token in app.commands:
                commands.append(token)
            elif re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
                options.append(token.split("=")[0])
            elif token == "|" or not commands:
                if not commands and re.fullmatch(r"[a-z]+", token):
                    problems.append(f"{where}: no command '{token}'")
                if token != "|":
                    break
        for option in options:
            known = [_options(app.commands[c]) for c in commands] or [_options(app)]
            if not all(option in k for k in known):
                problems.append(f"{where}: {'/'.join(commands) or 'msdda'} has no option {option}")
        checked += bool(commands or options)
    assert not problems, "\n".join(problems)
    assert checked > 30, checked


def test_every_written_benchmark_command_names_a_script_and_its_options():
    problems = []
    for path in DOCS:
        text = path.read_text()
        for script, rest in re.findall(r"python\s+(benchmarks/[\w]+\.py)([^`\n]*(?:\n[^`\n]+){0,2})`", text):
            source = REPO / script
            if not source.is_file():
                problems.append(f"{path.name}: no {script}")
                continue
            code = source.read_text()
            for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
                if f'"{option}"' not in code:
                    problems.append(f"{path.name}: {script} has no option {option}")
        for script in re.findall(r"(benchmarks/[\w]+\.(?:py|sh))", text):
            if not (REPO / script).is_file():
                problems.append(f"{path.name}: no {script}")
    assert not problems, "\n".join(problems)


def test_make_targets_written_in_the_docs_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
    for path in DOCS:
        for target in re.findall(r"`make ([\w-]+)`|^make ([\w-]+)", path.read_text(), flags=re.MULTILINE):
            name = target[0] or target[1]
            assert name in targets, f"{path.name}: make {name}"


def test_the_cli_page_lists_every_command_with_its_options():
    app = _app()
    text = (REPO / "docs" / "cli.md").read_text().replace("\\|", "/")  # an escaped | inside a cell
    rows = re.findall(r"^\| `msdda (\w+)` \|[^|]*\|([^|]*)\|$", text, re.MULTILINE)
    assert sorted(name for name, _ in rows) == sorted(app.commands)
    for name, options in rows:
        for option in re.findall(r"-{1,2}[a-z][\w-]*", options):
            assert option in _options(app.commands[name]), f"msdda {name} {option}"


def test_yaml_blocks_are_valid_configs():
    import yaml

    from configs import parse_config

    blocks = [(path, block) for path in DOCS for block in code_blocks(path, "yaml")]
    assert blocks
    for path, block in blocks:
        parse_config(yaml.safe_load(block), path.name)


# ------------------------------------------------------------------------------------ the examples, run


@pytest.fixture
def registry_home(tmp_path_factory, template_db, tiny_home, tiny_base_models, tiny_config_file, monkeypatch):
    """A home holding the tiny reference and evaluator, both tiny base models registered as champions in its
    own SQLite store, as `MSDDA_HOME`, and the tiny config as the default config."""
    import configs.schema
    from tests.conftest import copy_pretrained
    from tests.helpers import register_champions

    home = copy_pretrained(tiny_home, tmp_path_factory.mktemp("docs_home"))
    shutil.copy(template_db, home / "mlflow.db")  # migrating a new store takes seconds
    monkeypatch.setenv("MSDDA_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setattr(configs.schema, "DEFAULT_CONFIG", tiny_config_file)
    register_champions(home, tiny_base_models)
    return home


def test_the_readme_python_quickstart_runs(registry_home, tiny_config, tmp_path, monkeypatch, capsys):
    (block,) = code_blocks(README, "python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (Python quickstart)", "exec"), namespace)  # noqa: S102 - as a user pastes it
    from PIL import Image

    for w in (0.25, 0.5, 0.75):
        assert Image.open(tmp_path / f"seven-{w}.png").size == (16, 16)
    steps = tiny_config.sampling.num_inference_steps
    assert namespace["output"].nfe == 2 * steps, "the comment: one UNet row per base model and step"
    assert capsys.readouterr().out.strip() == str(namespace["output"].nfe)


def test_the_getting_started_python_examples_run(registry_home, tmp_path, monkeypatch, capsys):
    stock, pipeline = code_blocks(REPO / "docs" / "getting-started.md", "python")
    monkeypatch.chdir(tmp_path)
    reference = next((registry_home / "reference").iterdir())
    namespace: dict = {"path": str(reference)}  # `path` from `msdda pretrain --json`
    exec(compile(stock, "getting-started.md (stock pipeline)", "exec"), namespace)  # noqa: S102
    assert len(namespace["images"]) == 1
    exec(compile(pipeline, "getting-started.md (MSDDAPipeline)", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:3]] == ["msdda", "db", "rs"]
    assert namespace["searched"].reward_calls > 0
    assert list(namespace["pipe"].base_models) == ["digit_alignment"]


@pytest.mark.slow  # four composes, two sweeps (the trainings are cached); the options are checked above
def test_the_command_line_quickstarts_run(trained_home, tiny_config_file, tmp_path, monkeypatch):
    """The README's command-line quickstart, then the composing examples of docs/getting-started.md, as
    written, each with the tiny config added. Its `msdda train`s find the session's tiny base models in the
    cache (training itself is checked elsewhere) and register them. The tiny models learn next to nothing in
    their two iterations, so they never earn `champion`: they are given it, as a real training gives it,
    before the first compose."""
    from mlflow.tracking import MlflowClient

    from flows.cli import PRIVATE_DEFAULTS, main
    from flows.tracking import tracking_uri

    for name in PRIVATE_DEFAULTS:  # the command sets them: put them back afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    app = _app()
    (readme_block,) = [b for b in code_blocks(README, "bash") if "msdda pretrain" in b]
    (compose_block,) = code_blocks(REPO / "docs" / "getting-started.md", "bash")[1:]
    commands = commands_of(readme_block) + commands_of(compose_block)
    assert [c[0] for c in commands][:4] == ["pretrain", "train", "train", "models"]
    for args in commands:
        if args[0] == "models":
            client = MlflowClient(tracking_uri(trained_home))
            for model in client.search_registered_models():
                client.set_registered_model_alias(model.name, "champion", "1")
        config = ["--config", str(tiny_config_file)] if "--config" in _options(app.commands[args[0]]) else []
        assert main([*args, *config]) == 0, f"msdda {shlex.join(args)}"
    manifest = json.loads((tmp_path / "seven" / "manifest.json").read_text())
    assert len(manifest["images"]) == 8
    assert {image["prompt"] for image in manifest["images"]} == {"a handwritten digit seven"}
    assert json.loads((tmp_path / "samples" / "manifest.json").read_text())["method"] == "db"


def test_the_flow_tables_list_every_flow():
    """``flows.pipeline.FLOWS`` is the flows' registry: the module's table and docs/operations.md's list each
    of them, and nothing else."""
    from flows import pipeline

    in_module = re.findall(r"^``([a-z][a-z-]+)``\s", pipeline.__doc__, re.MULTILINE)
    assert in_module == list(pipeline.FLOWS)
    operations = (REPO / "docs" / "operations.md").read_text()
    table = operations.split("| flow | what it does |", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `([a-z-]+)` \|", table, re.MULTILINE) == list(pipeline.FLOWS)
