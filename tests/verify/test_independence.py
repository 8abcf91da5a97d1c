"""verify/ is the trust core a client uses alone: it must not pull in node/ or p2p/."""

import subprocess
import sys


def test_import_verify_loads_neither_node_nor_p2p():
    code = (
        "import sys, verify, verify.sampling, verify.canonical, verify.receipts, verify.identity, verify.merkle; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('node', 'p2p', 'tvm', 'libp2p')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
