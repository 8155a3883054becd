"""The README's "blog part -> file and function -> lines" table names the lines where each piece is now."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|[^|]*\|[^|]*\| `(\w+\.py)` `([\w.]+)` \| (\d+)-(\d+) \|$")


def definition_lines(path, dotted):
    """(first, last) line of the class or function `dotted` (e.g. LoraLayer.forward) in `path`."""
    nodes = ast.parse(path.read_text()).body
    for name in dotted.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        nodes = node.body
    return node.lineno, node.end_lineno


def test_every_row_of_the_blog_table_points_at_its_definition():
    rows = [ROW.match(line) for line in (ROOT / "README.md").read_text().splitlines()]
    rows = [m for m in rows if m]
    assert len(rows) >= 20
    for m in rows:
        file, name, first, last = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        assert definition_lines(ROOT / file, name) == (first, last), f"README: {file} {name} {first}-{last}"
