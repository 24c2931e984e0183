"""Explicit engines: capsules bound to them, get/connect/pause/resume/destroy by id, list,
snapshot to a template, fork, and capsules that outlive their engine."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest

import capsule
from capsule import Capsule, Engine

ProbeFactory = Callable[..., Capsule]


def test_engine_properties(engine: Engine, tmp_path: Path) -> None:
    assert engine.data_dir == tmp_path / "data"
    host = engine.host
    assert isinstance(host, capsule.HostInfo)
    assert host.virtualization in ("vmx", "svm", "pvm", "unknown")
    assert host.can_boot_linux == (host.virtualization in ("vmx", "svm"))
    assert host.max_vcpus >= 1 and host.description
    assert str(tmp_path) in repr(engine)


def test_capsules_are_bound_to_their_engine(engine: Engine, probe: ProbeFactory) -> None:
    c = probe()
    assert c.engine is engine
    same = engine.get(c.capsule_id)
    assert same.capsule_id == c.capsule_id and same.engine is engine
    assert same.commands.run("count").stdout == "1\n"
    assert c.commands.run("count").stdout == "2\n"  # one capsule, two handles


def test_by_id_calls_on_the_engine(engine: Engine, probe: ProbeFactory) -> None:
    c = probe()
    engine.pause(c.capsule_id)
    assert c.status == "paused"
    engine.resume(c.capsule_id)
    assert c.is_running()
    engine.pause(c.capsule_id)
    connected = engine.connect(c.capsule_id)  # resumes a paused capsule
    assert connected.is_running()
    engine.destroy(c.capsule_id)
    assert c.status == "stopped"


def test_list_is_oldest_first(engine: Engine, probe: ProbeFactory) -> None:
    a, b = probe(), probe()
    b.pause()
    infos = engine.list()
    assert [(i.capsule_id, i.status) for i in infos] == [
        (a.capsule_id, "running"),
        (b.capsule_id, "paused"),
    ]


def test_snapshot_makes_a_template(engine: Engine, probe: ProbeFactory) -> None:
    source = probe(vcpus=1, memory_mb=32)
    source.commands.run("count")
    source.commands.run("touch 10")
    template = source.snapshot("warm")
    assert isinstance(template, capsule.TemplateInfo)
    assert (template.name, template.vcpus, template.memory_mb) == ("warm", 1, 32)
    assert template.disk_bytes > 0 and template.created_at.tzinfo is not None
    assert source.is_running()  # the source keeps running
    assert [t.name for t in engine.templates()] == ["warm"]

    clone = engine.create("warm", wait=True)
    assert clone.get_info().template == "warm"
    assert clone.commands.run("count").stdout == "2\n"  # the template's state
    assert clone.commands.run("sum").stdout == source.commands.run("sum").stdout
    clone.destroy()
    engine.delete_template("warm")
    assert engine.templates() == []


def test_fork(engine: Engine, probe: ProbeFactory) -> None:
    parent = probe()
    parent.commands.run("count")
    children = parent.fork(3)
    assert len(children) == 3
    assert len({c.capsule_id for c in children} | {parent.capsule_id}) == 4
    for child in children:
        assert child.engine is engine and child.is_running()
        assert child.commands.run("count").stdout == "2\n"  # each from the parent's state
    assert parent.commands.run("count").stdout == "2\n"  # the parent is unchanged
    assert parent.fork(0) == []

    parent.pause()
    by_id = engine.fork(parent.capsule_id, 1)  # a paused capsule forks too
    assert by_id[0].commands.run("count").stdout == "3\n"
    assert parent.status == "paused"


def test_paused_capsules_outlive_their_engine(tmp_path: Path) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("SKIPPED: /dev/kvm does not exist on this host")
    data = tmp_path / "data"
    engine = Engine(data_dir=data)
    c = engine.create("probe", memory_mb=32, wait=True)
    c.commands.run("count")
    c.pause()
    capsule_id = c.capsule_id
    # The engine closes (releasing its data directory) once it and its capsules are gone.
    del engine, c
    gc.collect()

    reopened = Engine(data_dir=data)
    assert [(i.capsule_id, i.status) for i in reopened.list()] == [(capsule_id, "paused")]
    c = reopened.connect(capsule_id)
    assert c.is_running()
    assert c.commands.run("count").stdout == "2\n"
    c.destroy()
