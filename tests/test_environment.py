"""What `import ueo` sets for PyTorch before torch starts: thread waits and large pages."""

import os
import subprocess
import sys


def settings_after_import(env: dict) -> list[str]:
    code = (
        "import os, ueo; print(os.environ['OMP_WAIT_POLICY'], os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return run.stdout.split()


def test_import_sets_passive_waits_and_large_pages():
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")
    }
    assert settings_after_import(env) == ["PASSIVE", "1"]


def test_a_users_choice_is_kept():
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE", THP_MEM_ALLOC_ENABLE="0")
    assert settings_after_import(env) == ["ACTIVE", "0"]
