"""rescue.py's map stays true: sections (the banner comments) depend only on sections above
them, and no section grows past what one reader can hold."""

import ast
import re

from conftest import RESCUE

BANNER = re.compile(r"^# ={20,}\n# (\d+)\. (.+)$", re.M)
MAX_SECTION_LINES = 1500


def sections(text):
    """[(number, title, first line, last line)] from the banner comments."""
    starts = [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in BANNER.finditer(text)]
    total = text.count("\n") + 1
    return [(num, title, line, (starts[i + 1][2] - 1) if i + 1 < len(starts) else total)
            for i, (num, title, line) in enumerate(starts)]


def defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def local_names(node):
    """Names a statement binds inside itself (parameters, assignments, loop and with targets,
    nested definitions): uses of those are not uses of a top-level name."""
    bound = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            bound.add(sub.name)
    return bound


def annotations(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg) and sub.annotation is not None:
            yield sub.annotation
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.returns is not None:
            yield sub.returns
        elif isinstance(sub, ast.AnnAssign):
            yield sub.annotation


def used_names(node):
    """Every top-level name a statement refers to, also inside string annotations."""
    names = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)}
    for annotation in annotations(node):
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                names |= {n.id for n in ast.walk(ast.parse(sub.value, mode="eval")) if isinstance(n, ast.Name)}
    return names - (local_names(node) if not isinstance(node, (ast.Assign, ast.AnnAssign)) else set())


def section_of(line, table):
    return next(i for i, (_, _, first, last) in enumerate(table) if first <= line <= last)


def backward_uses(text):
    """[(user, its section, name used, the later section that defines it)]."""
    table = sections(text)
    tree = ast.parse(text)
    home = {}
    for node in tree.body:
        for name in defined_names(node):
            home.setdefault(name, section_of(node.lineno, table)) if node.lineno >= table[0][2] else None
    problems = []
    for node in tree.body:
        if node.lineno < table[0][2] or not defined_names(node):
            continue
        here = section_of(node.lineno, table)
        for name in sorted(used_names(node)):
            if home.get(name, -1) > here:
                problems.append((defined_names(node)[0], table[here][1], name, table[home[name]][1]))
    return problems


def test_sections_are_numbered_in_order():
    numbers = [int(num) for num, _, _, _ in sections(RESCUE.read_text())]
    assert numbers == list(range(1, len(numbers) + 1))


def test_sections_depend_only_on_sections_above_them():
    problems = backward_uses(RESCUE.read_text())
    assert not problems, "\n".join(f"{user} (section {a}) uses {name}, defined further down in section {b}"
                                   for user, a, name, b in problems)


def test_no_section_is_too_long():
    long = [(title, last - first) for _, title, first, last in sections(RESCUE.read_text())
            if last - first > MAX_SECTION_LINES]
    assert not long


def test_the_map_in_the_docstring_names_every_section():
    text = RESCUE.read_text()
    docstring = ast.get_docstring(ast.parse(text))
    for num, title, _, _ in sections(text):
        assert re.search(rf"^\s*{num}\. {re.escape(title.split(':')[0])}", docstring, re.M), title


def test_the_checker_finds_a_use_of_a_later_section():
    text = ("# " + "=" * 30 + "\n# 1. first\n# " + "=" * 30 + "\n"
            "def early() -> 'Later':\n    return helper()\n"
            "# " + "=" * 30 + "\n# 2. second\n# " + "=" * 30 + "\n"
            "def helper():\n    return 1\nclass Later:\n    pass\n")
    assert backward_uses(text) == [("early", "first", "Later", "second"), ("early", "first", "helper", "second")]
