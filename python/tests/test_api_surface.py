"""The package's surface: the type stubs describe the native module exactly, everything
public has a docstring, and the package ships its typing marker."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import capsule
from capsule import _native

PACKAGE = Path(capsule.__file__).resolve().parent


def stub_tree() -> ast.Module:
    return ast.parse((PACKAGE / "_native.pyi").read_text())


def test_typing_files_are_installed() -> None:
    assert (PACKAGE / "py.typed").exists()
    assert (PACKAGE / "_native.pyi").exists()


def test_stubs_match_the_native_module() -> None:
    tree = stub_tree()
    # Private stub classes (the file object protocols) are for typing only.
    stub_classes = {
        n.name: n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and not n.name.startswith("_")
    }
    runtime = {
        name
        for name, value in vars(_native).items()
        if isinstance(value, type) and not name.startswith("_")
    }
    assert set(stub_classes) == runtime
    for name, node in stub_classes.items():
        cls = getattr(_native, name)
        if issubclass(cls, BaseException):
            continue
        stubbed = {
            n.name
            for n in node.body
            if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
        }
        public = {m for m in dir(cls) if not m.startswith("_")}
        assert stubbed == public, name


def test_stub_signatures_match_the_native_ones() -> None:
    tree = stub_tree()
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
            continue
        cls = getattr(_native, node.name)
        for fn in node.body:
            if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
                continue
            if fn.name.startswith("_") and fn.name != "__new__":
                continue
            target = cls if fn.name == "__new__" else getattr(cls, fn.name)
            try:
                params = inspect.signature(target).parameters
            except ValueError:
                continue
            args = fn.args.args + fn.args.kwonlyargs
            stubbed = [a.arg for a in args if a.arg not in ("self", "cls")]
            actual = [p for p in params if p not in ("self", "$self", "cls")]
            assert stubbed == actual, (node.name, fn.name)


def test_everything_public_has_a_docstring() -> None:
    missing = []
    for name in capsule.__all__:
        obj = getattr(capsule, name)
        if name == "__version__":
            continue
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        if not obj.__doc__:
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or attr == "commands":
                    continue
                if not getattr(value, "__doc__", None):
                    missing.append(f"{name}.{attr}")
    assert not missing, missing
    assert capsule.__doc__ and capsule.Capsule.pause.__doc__
    assert capsule.__version__


def test_the_api_shape_of_the_issue() -> None:
    sig = inspect.signature(capsule.Capsule)
    assert list(sig.parameters) == ["template", "timeout", "wait", "vcpus", "memory_mb"]
    assert [p.default for p in sig.parameters.values()] == ["minimal", None, False, None, None]
    wait_ready = inspect.signature(capsule.Capsule.wait_ready).parameters
    assert (wait_ready["timeout"].default, wait_ready["interval"].default) == (30, 0.5)
    run = inspect.signature(capsule.Commands.run).parameters
    assert list(run) == [
        "self",
        "cmd",
        "env",
        "cwd",
        "timeout",
        "user",
        "background",
        "on_stdout",
        "on_stderr",
        "stdin",
        "clear_env",
        "output_limit",
    ]
    handle = {m for m in dir(capsule.CommandHandle) if not m.startswith("_")}
    assert {"pid", "wait", "kill", "send_stdin", "close_stdin", "signal"} <= handle
    files = {m for m in dir(capsule.Files) if not m.startswith("_")}
    assert files == {
        "with_timeout",
        "read",
        "read_text",
        "write",
        "read_into",
        "write_from",
        "list",
        "exists",
        "stat",
        "make_dir",
        "remove",
        "rename",
        "upload",
        "download",
    }
    pty = {m for m in dir(capsule.PtyHandle) if not m.startswith("_")}
    assert pty == {"pid", "write", "resize", "kill", "signal", "wait", "next_chunk"}
