"""The recipes of docs/integrations.md run as written (their python code blocks, in order, in one
namespace)."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def test_integrations_recipes_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {"__name__": "integrations_md"}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)
