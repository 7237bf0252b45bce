"""One GPU per worker pool child, and decode threads sized to the node: the assignment logic, no GPU needed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from core.config import ConfigError, load_settings
from core.ml.devices import VISIBLE_DEVICES, assign_device, decode_thread_count, parse_device_list, pin_pool_child


@pytest.fixture
def no_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA_VISIBLE_DEVICES now, and whatever a test sets is undone afterwards."""
    monkeypatch.setenv(VISIBLE_DEVICES, "")
    monkeypatch.delenv(VISIBLE_DEVICES)


def test_each_child_of_a_four_gpu_node_takes_its_own_gpu() -> None:
    devices = [assign_device(child, 4, (), (), 4) for child in range(4)]
    assert [d.device for d in devices if d] == ["0", "1", "2", "3"]
    assert all(d is not None and d.sharing == 1 for d in devices)


def test_configured_devices_win_over_the_visible_ones_and_the_count() -> None:
    assignment = assign_device(1, 2, ("2", "3"), ("0", "1", "2", "3"), 4)
    assert assignment is not None and assignment.device == "3" and assignment.devices == ("2", "3")


def test_the_workers_own_visible_devices_are_the_candidates() -> None:
    uuids = ("GPU-aaaa", "GPU-bbbb")
    assert [assign_device(c, 2, (), uuids, 8).device for c in range(2)] == list(uuids)  # type: ignore[union-attr]


def test_more_children_than_gpus_share_them_in_turn_and_say_so() -> None:
    assignments = [assign_device(child, 3, (), (), 2) for child in range(3)]
    assert [a.device for a in assignments] == ["0", "1", "0"]  # type: ignore[union-attr]
    assert [a.sharing for a in assignments] == [2, 1, 2]  # type: ignore[union-attr]
    assert "shared with 1 other" in assignments[0].describe()  # type: ignore[union-attr]


def test_a_replaced_child_takes_the_gpu_of_the_one_it_replaces() -> None:
    # Celery's pool gives a replacement the index of the dead child: same index, same GPU.
    assert assign_device(2, 4, (), (), 4) == assign_device(2, 4, (), (), 4)


def test_no_gpu_means_no_assignment() -> None:
    assert assign_device(0, 2, (), (), 0) is None


def test_bad_indices_are_refused() -> None:
    with pytest.raises(ValueError):
        assign_device(-1, 2, (), (), 2)
    with pytest.raises(ValueError):
        assign_device(0, 0, (), (), 2)


def test_device_lists_parse_and_bad_settings_fail_loudly(tmp_path: Path) -> None:
    assert parse_device_list(" 0, 1,,GPU-ab ") == ("0", "1", "GPU-ab")
    assert parse_device_list(None) == ()
    assert load_settings({"TRIAGE_CUDA_DEVICES": "0,1,GPU-3f2a"}, data_dir=tmp_path).cuda_devices == "0,1,GPU-3f2a"
    with pytest.raises(ConfigError, match="TRIAGE_CUDA_DEVICES"):
        load_settings({"TRIAGE_CUDA_DEVICES": "0;1"}, data_dir=tmp_path)


@pytest.mark.usefixtures("no_visible_devices")
def test_pinning_sets_the_childs_visible_device_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({}, data_dir=tmp_path, cuda_devices="4,5,6", worker_concurrency=3)
    with caplog.at_level(logging.INFO, logger="core.ml.devices"):
        assignment = pin_pool_child(settings, child=2)
    assert assignment is not None and assignment.device == "6"
    assert os.environ[VISIBLE_DEVICES] == "6"
    assert "pool child 2 uses GPU 6" in caplog.text


@pytest.mark.usefixtures("no_visible_devices")
def test_a_cpu_worker_and_the_main_process_pin_nothing(tmp_path: Path) -> None:
    assert pin_pool_child(load_settings({}, data_dir=tmp_path, device="cpu", cuda_devices="1"), child=0) is None
    assert pin_pool_child(load_settings({}, data_dir=tmp_path, cuda_devices="1")) is None  # not a pool child
    assert VISIBLE_DEVICES not in os.environ


@pytest.mark.parametrize(
    ("configured", "cores", "concurrency", "expected"),
    [(0, 16, 1, 16), (0, 16, 4, 4), (0, 2, 4, 1), (6, 16, 4, 6), (0, 1, 1, 1)],
)
def test_decode_threads_share_the_nodes_cores_among_worker_processes(configured: int, cores: int, concurrency: int, expected: int) -> None:
    assert decode_thread_count(configured, cores, concurrency) == expected
