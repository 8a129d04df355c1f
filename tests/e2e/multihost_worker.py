"""One process of a multi-process test job (launched by tests/e2e/test_multihost.py).

  python tests/e2e/multihost_worker.py <coordinator> <num_processes> <process_id> <workdir> \
      <model_dir>
"""

import os
import sys

# 4 devices per process; -O0 like the suite (tests/conftest.py, TEST_XLA_OPT)
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"
                           " --xla_backend_optimization_level=0")
_E2E = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_E2E)
sys.path[:0] = [os.path.dirname(_TESTS), _E2E, _TESTS]  # the repository, e2e tests, helpers

from cai_jax import distributed  # noqa: E402


def main():
  coordinator, n, pid, workdir, model_dir = sys.argv[1:6]
  distributed.initialize("on", coordinator, int(n), int(pid))
  from test_p2_critique_revision import _config  # the same config as the 1-process run
  from cai_jax.phases import p2_critique_revision
  p2_critique_revision.run(_config(model_dir), workdir)


if __name__ == "__main__":
  main()
