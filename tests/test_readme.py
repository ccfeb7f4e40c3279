"""The README is the front door: its commands and flags must be the ones the code has, and the
commands it shows run as it says, where they can offline. bench/README.md's commands are held to the
same flags."""
import contextlib
import functools
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest

import checkpoints
import eval as evaluate
import merge
import onpolicy
import train

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BENCH_README = (ROOT / "bench" / "README.md").read_text()
# the README's prose with its line breaks as spaces
FLAT = " ".join(README.split())
QUICK_START = ("pip install -r requirements.txt && python train.py "
               "&& python eval.py --adapter runs/demo")
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def blocks(text, language):
    """The bodies of the text's fenced code blocks in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def commands(text):
    """Each command of the text's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(" ".join(line.split()))
    return found


def inline_commands(text):
    """Inline code outside the code blocks that is a python or torchrun command, as one line."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return [span for span in spans if re.match(r"(python \S+\.py|torchrun )", span)]


def tree_commands(text):
    """The commands the file tree names (its ```text blocks)."""
    return [match.strip() for block in blocks(text, "text")
            for match in re.findall(r"python \S+\.py[^)\n]*", block)]


def help_flags(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9-]+", capsys.readouterr().out)) - {"--help"}


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def parsers():
    """Each script the READMEs run, and the function that reads its command line."""
    bench = {f"bench/{name}.py": load_script(ROOT / "bench" / f"{name}.py")
             for name in ("step", "real_model", "lc_se", "loading", "degeneration")}
    return {"train.py": train.parse_args, "eval.py": evaluate.parse_args,
            "merge.py": merge.parse_args, "onpolicy.py": onpolicy.parse_args,
            "checkpoints.py": checkpoints.main,
            **{path: getattr(module, "parse_args", module.main) for path, module in bench.items()}}


def torchrun_flags():
    from torch.distributed.run import get_args_parser
    return {flag for action in get_args_parser()._actions for flag in action.option_strings}


def flags(words):
    return {word.split("=")[0] for word in words if word.startswith("--")}


def quiet(function, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = function([str(arg) for arg in argv])
    assert code in (0, None), err.getvalue()
    return out.getvalue()


def test_quick_start_is_the_two_commands_after_the_cpu_torch_install():
    assert QUICK_START in commands(README)
    assert "python -m pytest -q" in commands(README)
    # a CPU-only machine installs torch first, or pip pulls the CUDA build
    assert README.index(CPU_TORCH) < README.index(QUICK_START)
    assert train.parse_args([]).output_dir == "runs/demo"


def test_readme_test_command_is_what_ci_runs():
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quick_start_output_is_the_demos(demo_run):
    """The untrained accuracy is the seeded model's, exactly; the trained one may differ in its
    last digits from machine to machine."""
    before = re.search(r"held-out reward accuracy before training: [0-9.]+", README).group(0)
    assert before in demo_run.stdout
    after = float(re.search(r"accuracy after training: ([0-9.]+)", demo_run.stdout).group(1))
    assert after >= 0.95 and "held-out reward accuracy after training: 1.000" in README


def test_every_train_flag_is_documented_and_every_documented_flag_exists(capsys):
    train_flags = help_flags(train.parse_args, capsys)
    assert {f for f in train_flags if f not in README} == set(), (
        "train.py flags missing from the README")
    known = set().union(*(help_flags(parse, capsys) for parse in parsers().values()))
    known |= torchrun_flags() | {"--help", "--index-url", "--logdir"}
    for text in (README, BENCH_README):
        # a link's target is no flag
        text = re.sub(r"\]\([^)]*\)", "]", text)
        assert set(re.findall(r"--[a-z][a-z0-9-]+", text)) - known == set(), \
            "flags the code does not have"


def test_each_command_passes_only_its_own_scripts_flags(capsys):
    """Every command in the READMEs' code blocks, and every python command in their prose and in
    the file tree."""
    own = {script: help_flags(parse, capsys) | {"--help"} for script, parse in parsers().items()}
    checked = set()
    for command in (commands(README) + commands(BENCH_README) + inline_commands(README)
                    + inline_commands(BENCH_README) + tree_commands(README)):
        for part in command.split("&&"):
            words = [w for w in shlex.split(part) if not re.match(r"[A-Z_]+=", w)]
            if words[0] == "torchrun":
                at = words.index("train.py")
                assert flags(words[:at]) <= torchrun_flags(), command
                assert flags(words[at:]) <= own["train.py"], command
            elif words[0] == "python" and words[1].endswith(".py"):
                assert words[1] in own, f"{words[1]}: a script this test does not know"
                assert flags(words[2:]) <= own[words[1]], command
                checked.add(words[1])
            elif words[:2] == ["pip", "install"]:
                assert flags(words) <= {"--index-url"}, command
            else:
                assert words[0] in ("python", "../shared/fixtures/real-model/fetch-smollm2.sh"), \
                    f"a command this test does not know: {command}"
    assert {"train.py", "eval.py", "merge.py", "onpolicy.py", "checkpoints.py",
            "bench/step.py", "bench/real_model.py"} <= checked


def test_readme_conversational_command_trains(tmp_path, capsys):
    """The README's run on data/demo-chat as written, with runs/ moved under tmp_path: it passes
    every setting of the demo's, so its numbers and time are the demo's. Trained for the first of
    its 4 epochs: held-out accuracy is at 0.9 by then (test_offline_demo runs all 4)."""
    import demo
    command = next(c for c in commands(README) if "--dataset data/demo-chat" in c)
    argv = [arg.replace("runs/", f"{tmp_path}/runs/").replace("data/", f"{ROOT}/data/")
            for arg in command.split()[2:]]
    demo.build_tiny_model(tmp_path / "runs" / "demo-model")
    args = train.parse_args(argv)
    settings = {k: v for k, v in demo.TRAINING.items()
                if k not in ("dataset", "split", "output_dir", "load_in_4bit")}
    assert {k: getattr(args, k) for k in settings} == settings
    assert train.main(argv + ["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy after training: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.9, out
    assert re.search(r"\(\d+ s on the same CPU, one thread, ending `held-out reward accuracy "
                     r"after training: 1\.000", FLAT)


def test_the_example_rows_load_as_the_same_pair(tmp_path):
    """The README's standard and conversational rows are one pair in two layouts."""
    import demo
    import modeling
    import preferences
    demo.build_tiny_model(tmp_path / "model")
    tokenizer = modeling.load_tokenizer(str(tmp_path / "model"))
    rows = blocks(README, "json")[0].splitlines()
    assert len(rows) == 2
    pairs = []
    for name, row in zip(("standard", "conversational"), rows, strict=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text(row + "\n")
        examples, _, _ = preferences.load_examples(tokenizer, str(tmp_path / name), "train")
        pairs.append({k: list(examples[0][k]) for k in ("prompt", "chosen", "rejected")})
    assert pairs[0] == pairs[1]
    assert json.loads(rows[0])["prompt"] in (ROOT / "data" / "demo" / "test.jsonl").read_text()


def test_merge_eval_and_chat_snippet_run_on_the_demo(demo_run, tmp_path):
    """The merge and eval commands as written, on the demo run, then the chat snippet on the
    merged folder: the demo's model answers a shout in capitals, as the README says."""
    merge_command, eval_command = (next(c for c in commands(README) if c.startswith(start))
                                   for start in ("python merge.py", "python eval.py --model"))
    paths = {"runs/demo": demo_run.run, "runs/demo-merged": tmp_path / "demo-merged",
             "runs/demo-model": demo_run.model}
    quiet(merge.main, [paths.get(arg, arg) for arg in merge_command.split()[2:]])
    report = quiet(evaluate.main, [paths.get(arg, arg) for arg in eval_command.split()[2:]])
    assert "reward accuracy" in report
    snippet = blocks(README, "python")[0]
    assert snippet.count('"runs/demo-merged"') == 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("runs/demo-merged", str(paths["runs/demo-merged"])), {})
    answer = out.getvalue().strip()
    assert answer and answer.isupper(), answer
    assert "it answers in capitals" in FLAT


def test_hub_upload_names_the_merged_folder():
    """Uploading needs the network and a login, so it is not run: the command must name the
    folder the README's merge writes."""
    merge_command = next(c for c in commands(README) if c.startswith("python merge.py"))
    out = merge_command.split("--out ")[1].split()[0]
    assert f"`hf upload USER/NAME {out}`" in FLAT


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_bench_readme_reach_a_heading():
    anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", BENCH_README, flags=re.M)}
    links = re.findall(r"\(bench/README\.md#([^)]+)\)", README)
    assert links and set(links) <= anchors, set(links) - anchors


def test_demo_data_is_what_demo_py_writes(tmp_path):
    import demo
    demo.write_data(tmp_path / "demo")
    for folder in ("demo", "demo-chat"):
        for name in ("train.jsonl", "test.jsonl"):
            assert ((tmp_path / folder / name).read_text()
                    == (ROOT / "data" / folder / name).read_text())
