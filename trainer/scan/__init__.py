"""Linear scan h_t = a_t * h_{t-1} + x_t for the recurrent layers (see op.py).

One public function, `linear_scan`; `linear_scan_bidirectional` is the fused entry the
bidirectional layers call; `linear_scan_reference` is the readable definition the compiled
backends are tested against.
"""

from trainer.scan.op import linear_scan, linear_scan_bidirectional
from trainer.scan.reference import linear_scan_reference

__all__ = ["linear_scan", "linear_scan_bidirectional", "linear_scan_reference"]
