"""A cheating node for tests: a real ``proofmesh run`` node serving one model while claiming
another's model_id (``PROOFMESH_TEST_CLAIMED_MODEL_ID``) in its capability record and in every
receipt it signs. Run as ``python -m tests.p2p.impostor run ...``."""

from __future__ import annotations

import os
import sys

from node.cli import main
from node.runtime.loading import LoadedModel

if __name__ == "__main__":
    LoadedModel.model_id = property(lambda self: os.environ["PROOFMESH_TEST_CLAIMED_MODEL_ID"])
    sys.exit(main(sys.argv[1:]))
