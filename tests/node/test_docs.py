"""docs/cluster-setup.md must show what the code really does and prints."""

import shlex
from pathlib import Path

from heady_node import presets
from heady_node.cli import _parser
from heady_node.presets import table_rows
from heady_node.session import NodeSession
from heady_shared.routes import DEFAULT_POOLS

DOC = Path(__file__).resolve().parents[2] / "docs" / "cluster-setup.md"


def test_doc_preset_table_matches_code() -> None:
    text = DOC.read_text()
    for role, gpu, model, ctx, quant, est, bud in table_rows():
        row = f"| {role} | {gpu} | `{model}` | {ctx} | {quant} | {est} / {bud} |"
        assert row in text, f"docs/cluster-setup.md lacks or misstates: {row}"


def test_doc_sample_output_is_what_a_node_prints() -> None:
    secrets = {
        "NODE_TOKEN": "x",
        "CF_TUNNEL_TOKEN_3": "t3",
        "CF_TUNNEL_HOSTNAME_3": "node3.example.com",
    }
    lines: list[str] = []
    s = NodeSession(
        node=3,
        gpu_runner=lambda argv: "Tesla T4, 15360 MiB, 7.5, 550.54.15",
        secret=lambda name: secrets.get(name, ""),
        out=lines.append,
    )
    s.preflight()
    assert s.preset is not None
    argv = presets.engine_argv(
        s.preset, port=8000, engine=["vllm", "serve"], served_names=s.served_names
    )
    lines.append("Starting: " + shlex.join(argv))
    text = DOC.read_text()
    for line in lines:
        assert f"\n{line}\n" in text, f"docs/cluster-setup.md lacks the printed line: {line}"


def test_doc_lists_every_serve_flag() -> None:
    text = DOC.read_text()
    serve = _parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = [a.option_strings[0] for a in serve._actions if a.option_strings[0] != "-h"]
    for flag in flags:
        assert f"| `{flag}" in text, f"docs/cluster-setup.md: no row for heady-node serve {flag}"


def test_doc_names_the_model_names_each_node_answers_to() -> None:
    text = DOC.read_text()
    for pool in DEFAULT_POOLS.values():
        first, last = pool.pair[0], pool.pair[-1]
        names = presets.served_model_names("repo", first)[1:]
        assert names == presets.served_model_names("repo", last)[1:]
        row = f"| {first}\u2013{last} | {pool.role} | " + ", ".join(f"`{n}`" for n in names)
        assert row in text, f"docs/cluster-setup.md lacks or misstates: {row}"
