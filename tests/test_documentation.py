"""The documents, read as a user reads them.

Every bash block in ``documentation/`` without a ``# needs: ...`` first line runs here on tiny data, in document
order, in one sandbox (later documents go on from the laptop run of pretraining.md). Every block of the README and
the documents, marked or not, and every trainer and planner table, may name only commands, flags, trainers, planners,
fingerprint extractors, plans and environment variables that exist. Every link resolves, every nnssl environment
variable the code reads is documented, and every nnssl command's ``--help`` is complete, fast and torch-free."""

import argparse
import ast
import os
import re
import runpy
import subprocess
import sys
import time
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set
from unittest import mock

import pytest

from conftest import console_script, run_command
from test_readme_quickstart import users_environment
from doc_blocks import (NEEDS, Block, Command, anchors, bash_blocks, commands, launcher_split, links, split_options,
                        table_first_cells, variables)

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTATION = REPOSITORY / "documentation"
README = REPOSITORY / "README.md"
CHANGELOG = REPOSITORY / "CHANGELOG.md"
# The order the runnable blocks execute in: each document may go on from the state the ones before it left.
DOCUMENT_ORDER = ("installation.md", "pretraining.md", "finetuning.md", "probe.md", "checkpoints.md", "multi_gpu.md",
                  "long_runs.md", "environment_variables.md", "benchmarks.md", "evidence.md", "troubleshooting.md",
                  "troubleshooting-bad-input.md")
BLOCK_TIMEOUT_SECONDS = 600
HELP_SECONDS = 2.0
NNUNET_PLANS = {"nnUNetPlans"}
PLANS_DEFINING_OPTIONS = {("nnssl_prepare_finetune", "-p"), ("nnssl_prepare_finetune", "--plans_name"),
                          ("nnUNetv2_plan_and_preprocess", "-overwrite_plans_name"),
                          ("nnUNetv2_plan_experiment", "-overwrite_plans_name")}
TRAINER_OPTIONS = {"-tr", "--arms", "--pretrainers", "--baseline"}  # values: TRAINER or TRAINER@PRETRAINER
PLANNING_CLASS_OPTIONS = {"-pl", "-fpe"}


def documents() -> List[Path]:
    return [DOCUMENTATION / name for name in DOCUMENT_ORDER if (DOCUMENTATION / name).exists()]


def markdown_files() -> List[Path]:
    return [README, CHANGELOG] + documents()


# ------------------------------------------------------------------------------------------- what the code offers
class ParserCaptured(Exception):
    """Raised instead of parsing, carrying the parser a command built."""


def captured_parser(run: Callable[[], object], program: str) -> argparse.ArgumentParser:
    """The argparse parser a command's entry point builds, taken when it starts parsing (nothing else runs)."""
    def capture(self, *args, **kwargs):
        raise ParserCaptured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
            mock.patch.object(sys, "argv", [program]):
        try:
            run()
        except ParserCaptured as captured:
            return captured.args[0]
    raise AssertionError(f"{program} returned without parsing its arguments")


def console_scripts() -> Dict[str, object]:
    return {entry.name: entry for entry in entry_points(group="console_scripts")}


def nnssl_scripts() -> List[str]:
    return sorted(name for name, entry in console_scripts().items() if entry.value.startswith("nnssl."))


@lru_cache(maxsize=None)
def console_parser(name: str) -> Optional[argparse.ArgumentParser]:
    entry = console_scripts().get(name)
    return None if entry is None else captured_parser(entry.load(), name)


@lru_cache(maxsize=None)
def script_parser(relative_path: str) -> argparse.ArgumentParser:
    """The parser of a repository script (``python benchmarks/x.py``), run as ``__main__`` next to its siblings."""
    path = REPOSITORY / relative_path
    assert path.is_file(), f"{relative_path} does not exist"
    sys.path.insert(0, str(path.parent))
    try:
        return captured_parser(lambda: runpy.run_path(str(path), run_name="__main__"), relative_path)
    finally:
        sys.path.remove(str(path.parent))


@lru_cache(maxsize=None)
def trainer_exists(name: str) -> bool:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name) is not None
    except RuntimeError:
        return False


@lru_cache(maxsize=None)
def planning_class_exists(name: str) -> bool:
    """A planner or fingerprint extractor, looked up the way nnUNetv2_plan_and_preprocess looks up -pl and -fpe."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                       current_module="nnunetv2.experiment_planning") is not None


def plans_written_by_nnssl() -> Set[str]:
    from nnssl.plans import dynamic_finetune_planner, finetune_planner, nnssl_planner

    return {cls.default_plans_name for module in (nnssl_planner, finetune_planner, dynamic_finetune_planner)
            for cls in vars(module).values()
            if isinstance(cls, type) and isinstance(getattr(cls, "default_plans_name", None), str)}


def nnssl_source_files() -> List[Path]:
    import nnssl
    import nnssl.plans
    import nnssl.trainers

    folders = {Path(p) for package in (nnssl, nnssl.plans, nnssl.trainers) for p in package.__path__}
    return sorted({f for folder in folders for f in folder.rglob("*.py")})


@lru_cache(maxsize=None)
def variables_read_by_nnssl() -> Set[str]:
    """Environment variable names nnssl's code reads: ``*_VARIABLE(S)`` constants, ``os.environ.get``/``getenv``
    and ``*_from_environment`` calls with a literal name."""
    names: Set[str] = set()
    for path in nnssl_source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith(("_VARIABLE",
                                                                                           "_VARIABLES"))
                                                    for t in node.targets):
                value = node.value
                literals = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", [value])
                names.update(c.value for c in literals if isinstance(c, ast.Constant) and isinstance(c.value, str))
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                function = ast.unparse(node.func)
                if function in ("os.environ.get", "os.getenv") or function.endswith("_from_environment"):
                    names.add(node.args[0].value)
    return names


@lru_cache(maxsize=None)
def nnunet_variables() -> Set[str]:
    import nnunetv2

    text = "\n".join(p.read_text() for p in Path(nnunetv2.__path__[0]).rglob("*.py"))
    return set(re.findall(r"['\"](nnUNet_\w+)['\"]", text))


# ------------------------------------------------------------------------------------------------ static checks
def check_command(command: Command, plans: Set[str]) -> List[str]:
    """What is wrong with one command of a block (an empty list when nothing is)."""
    word, arguments = command.word, command.arguments
    if word == "torchrun":
        return check_torchrun(arguments, plans)
    if word in ("python", "python3") and arguments and arguments[0].endswith(".py"):
        return check_options(arguments[0], script_parser(arguments[0]), arguments[1:], plans)
    if word.startswith(("nnssl_", "nnUNetv2_")):
        parser = console_parser(word)
        if parser is None:
            return [f"{word} is not an installed command"]
        return check_options(word, parser, arguments, plans)
    return []


def check_torchrun(arguments: List[str], plans: Set[str]) -> List[str]:
    parser = console_parser("torchrun")
    own, launched = launcher_split(arguments, nargs_function(parser))
    if not launched:
        return ["torchrun without a command"]
    return (check_options("torchrun", parser, own, plans)
            + check_command(Command(launched[0], launched[1:]), plans))


def nargs_function(parser: argparse.ArgumentParser) -> Callable[[str], object]:
    """nargs of a parser's option (None, a single value, for an option the parser does not have)."""
    def nargs_of(option: str):
        action = parser._option_string_actions.get(option)
        return None if action is None else action.nargs

    return nargs_of


def check_options(program: str, parser: argparse.ArgumentParser, arguments: List[str],
                  plans: Set[str]) -> List[str]:
    options, _ = split_options(arguments, nargs_function(parser))
    problems = [f"{program} has no option {option}" for option, _ in options
                if option not in parser._option_string_actions]
    for option, values in options:
        for value in values:
            if "$" in value or not re.match(r"^\w+(@\w+)?$", value) or value.isupper():
                continue  # a shell variable or a placeholder
            if option in TRAINER_OPTIONS:
                problems += [f"{program} {option}: no trainer {name}" for name in value.split("@")
                             if not trainer_exists(name)]
            elif option in PLANNING_CLASS_OPTIONS and not planning_class_exists(value):
                problems.append(f"{program} {option}: nnU-Net finds no class {value}")
            elif option == "-p" and (program, option) not in PLANS_DEFINING_OPTIONS and value not in plans:
                problems.append(f"{program} -p: no planner writes plans {value}")
    return problems


def check_variables(block: Block) -> List[str]:
    problems = []
    for name in sorted(variables(block)):
        if name.lower().startswith("nnssl_") and name not in variables_read_by_nnssl():
            problems.append(f"nnssl reads no environment variable {name}")
        elif name.startswith("nnUNet_") and name not in nnunet_variables() | variables_read_by_nnssl():
            problems.append(f"neither nnU-Net nor nnssl reads {name}")
    return problems


@lru_cache(maxsize=None)
def known_plans() -> Set[str]:
    """Plans any planner writes, and plans names the documents themselves give (-p of nnssl_prepare_finetune,
    -overwrite_plans_name)."""
    names = set(NNUNET_PLANS) | plans_written_by_nnssl()
    for path in markdown_files():
        for block in bash_blocks(path):
            for command in commands(block):
                parser = console_parser(command.word) if command.word.startswith(("nnssl_", "nnUNetv2_")) else None
                if parser is None:
                    continue
                options, _ = split_options(command.arguments, nargs_function(parser))
                names.update(v for option, values in options for v in values
                             if (command.word, option) in PLANS_DEFINING_OPTIONS)
    return names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_block_names_only_what_exists(path):
    problems = []
    for block in bash_blocks(path):
        for command in commands(block):
            problems += [f"{block.where}: {p}" for p in check_command(command, known_plans())]
        problems += [f"{block.where}: {p}" for p in check_variables(block)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_tables_name_only_trainers_and_planners_that_exist(path):
    problems = []
    for cell in table_first_cells(path):
        names = re.findall(r"`([^`]+)`", cell)
        base = next((n for n in names if not n.startswith("_")), None)
        for name in names:
            full = base + name if name.startswith("_") and base else name
            if not re.match(r"^\w+$", full) or full in nnunet_variables():
                continue  # not a class name (a message, an option, an environment variable)
            if "Trainer" in full and not trainer_exists(full):
                problems.append(f"{path.name}: no trainer {full}")
            elif "Planner" in full and not planning_class_exists(full):
                problems.append(f"{path.name}: no planner {full}")
    assert not problems, "\n".join(problems)


def test_every_block_is_run_here_or_says_what_it_needs():
    problems = []
    for path in documents():
        for block in bash_blocks(path):
            needs = block.needs()
            if needs is not None and not set(needs) <= set(NEEDS):
                problems.append(f"{block.where}: '# needs: {', '.join(needs)}' is not among {NEEDS}")
    assert not problems, "\n".join(problems)
    assert {p.name for p in DOCUMENTATION.glob("*.md")} <= set(DOCUMENT_ORDER), \
        "every document needs a place in DOCUMENT_ORDER (its runnable blocks run in that order)"


# ------------------------------------------------------------------------------------------------------- links
@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_link_resolves(path):
    problems = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):
            continue  # an external address: not fetched here
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target} does not exist")
            continue
        if anchor and anchor not in anchors(linked):
            problems.append(f"{path.name}: {target}: {linked.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_links_every_document():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert all(f"documentation/{p.name}" in text for p in DOCUMENTATION.glob("*.md"))


def test_every_environment_variable_nnssl_reads_is_documented_and_nothing_else():
    documented = set(re.findall(r"^\| `((?:nnssl_|NNSSL_)\w+)`",
                                (DOCUMENTATION / "environment_variables.md").read_text(), flags=re.M))
    read = {name for name in variables_read_by_nnssl() if name.lower().startswith("nnssl_")}
    assert read and documented == read, f"undocumented: {read - documented}; not read: {documented - read}"


def test_versions_agree():
    import nnssl

    project = re.search(r'^version = "([^"]+)"', (REPOSITORY / "pyproject.toml").read_text(), flags=re.M).group(1)
    released = re.search(r"^## \[(\d+\.\d+\.\d+)\]", CHANGELOG.read_text(), flags=re.M).group(1)
    assert project == nnssl.__version__ == released


# ------------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("name", nnssl_scripts())
def test_help_is_complete_fast_and_imports_no_torch(name):
    parser = console_parser(name)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
        if action.option_strings and action.nargs != 0:
            assert action.metavar or action.choices, f"{name}: {action.option_strings} shows argparse's own metavar"
    assert "``" not in parser.format_help()

    probe = (f"import sys\nfrom importlib.metadata import entry_points\nsys.argv = [{name!r}, '--help']\n"
             f"entry = {{e.name: e for e in entry_points(group='console_scripts')}}[{name!r}]\ntry:\n"
             f"    entry.load()()\nexcept SystemExit:\n    pass\n"
             f"print('imported', [m for m in ('torch', 'nnunetv2') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("imported []"), result.stdout[-2000:] + result.stderr[-2000:]

    start = time.perf_counter()
    result = subprocess.run([console_script(name), "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and "usage:" in result.stdout
    assert seconds < HELP_SECONDS, f"{name} --help took {seconds:.2f} s"


# ---------------------------------------------------------------------------------------- what users are told
def test_demo_data_hint_is_the_readme_ingest_and_works(nnunet_dirs, tmp_path):
    """``nnssl_demo_data`` ends with the next command; following it gives the dataset the README's later paths use."""
    result = run_command(["nnssl_demo_data", "-o", tmp_path / "source", "--num_unlabeled", 1, "--num_labeled", 0],
                         timeout=300)
    hint = next(line for line in result.stdout.splitlines() if line.startswith("next: "))[len("next: "):].split()
    dataset = f"Dataset{int(hint[hint.index('-d') + 1]):03d}_{hint[hint.index('-n') + 1]}"
    assert f"{dataset}/" in README.read_text()
    run_command(hint + ["-np", 1], timeout=300)
    assert (nnunet_dirs["nnUNet_raw"] / dataset / "dataset.json").is_file()


# ------------------------------------------------------------------------------------ runnable blocks, executed
def test_runnable_blocks_run_in_document_order(tmp_path):
    """Each unmarked bash block of documentation/ in a bash of its own, in document order, in one sandbox, with the
    user's defaults (nnU-Net's threads and workers) and the laptop run's nnU-Net folders as pretraining.md exports
    them."""
    demo = tmp_path / "demo"
    env = dict(users_environment(), nnUNet_raw=str(demo / "nnUNet_raw"),
               nnUNet_preprocessed=str(demo / "nnUNet_preprocessed"), nnUNet_results=str(demo / "nnUNet_results"))
    runnable = [block for path in documents() for block in bash_blocks(path) if block.needs() is None]
    assert runnable, "no runnable block in the documentation"
    for block in runnable:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_SECONDS)
        assert result.returncode == 0, (f"{block.where} failed ({result.returncode}):\n{block.text}\n--- stdout ---\n"
                                        f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")
