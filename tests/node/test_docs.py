"""The README section must show the presets the code really uses."""

from pathlib import Path

from heady_node.presets import table_rows

DOC = Path(__file__).resolve().parents[2] / "README.md"


def test_doc_preset_table_matches_code() -> None:
    text = DOC.read_text()
    for role, gpu, model, ctx, quant, est, bud in table_rows():
        row = f"| {role} | {gpu} | `{model}` | {ctx} | {quant} | {est} / {bud} |"
        assert row in text, f"README.md lacks or misstates: {row}"
