"""Real DICOM peers as subprocesses, for integration tests, the demo and benchmarks.

* `StoreSCP` runs dcmtk ``storescp`` (a C-STORE receiver writing files into a directory);
* `storescu` / `astorescu` run dcmtk ``storescu`` (a C-STORE sender);
* `Orthanc` runs Debian's Orthanc 1.10 with a throw-away configuration and talks to its REST API.

None of these peers were written by this project, which is the point: they check our DICOM code against
independent implementations. Every process gets ``TCP_NODELAY=1`` in its environment (dcmtk, also inside
Orthanc, reads it); without it each C-STORE waits on a 40 ms delayed ACK.

Missing binaries raise `PeerUnavailableError` (install the Debian packages ``dcmtk`` and ``orthanc``);
tests must let it fail rather than skip.
"""

from devkit.peers._process import (
    LOCALHOST,
    PeerStartError,
    PeerUnavailableError,
    dcmtk_tool,
    free_port,
    orthanc_binary,
    peer_env,
    wait_for_port,
)
from devkit.peers.dcmtk import StoreSCP, astorescu, storescu, storescu_args
from devkit.peers.orthanc import Orthanc

__all__ = [
    "LOCALHOST",
    "Orthanc",
    "PeerStartError",
    "PeerUnavailableError",
    "StoreSCP",
    "astorescu",
    "dcmtk_tool",
    "free_port",
    "orthanc_binary",
    "peer_env",
    "storescu",
    "storescu_args",
    "wait_for_port",
]
