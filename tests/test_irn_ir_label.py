"""cam_to_ir_label with the dense CRF vs ``stage2/ir_label.npz`` (needs pydensecrf)."""
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE

FIX = REFERENCE / "stage2" / "ir_label.npz"


def test_ir_label_matches_reference():
    pytest.importorskip("pydensecrf")
    if not FIX.exists():
        pytest.skip(f"missing fixture {FIX}")
    from irn.steps.cam_to_ir_label import ir_label_from_cams

    ref = np.load(FIX)
    conf, (fg_arg, fg_crf, bg_arg, bg_crf) = ir_label_from_cams(
        ref["img"], ref["high_res"], ref["keys_fg"], float(ref["conf_fg_thres"]), float(ref["conf_bg_thres"]),
        return_parts=True)
    np.testing.assert_array_equal(fg_arg, ref["fg_argmax"])
    np.testing.assert_array_equal(bg_arg, ref["bg_argmax"])
    np.testing.assert_array_equal(fg_crf, ref["fg_crf"])
    np.testing.assert_array_equal(bg_crf, ref["bg_crf"])
    assert conf.dtype == np.uint8
    np.testing.assert_array_equal(conf, ref["ir_label"])
