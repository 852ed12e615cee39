"""Result builders without the network: identities, validity."""

from __future__ import annotations

import subprocess
import sys

import pytest

from storage.files import is_valid_uid

pytestmark = pytest.mark.unit  # fast: the unit layer (python -m pytest -m unit)


def test_result_uids_are_deterministic_across_processes_and_valid():
    from node.results import result_uid

    a = result_uid("1.2.3", 1, "sr-mammo-cad")
    code = "from node.results import result_uid; print(result_uid('1.2.3', 1, 'sr-mammo-cad'))"
    b = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert a == b and is_valid_uid(a) and a.startswith("2.25.")
    assert result_uid("1.2.3", 2, "sr-mammo-cad") != a
    assert result_uid("1.2.3", 1, "sc-L-CC") != a
