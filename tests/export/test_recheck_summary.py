"""The export summary's recheck text: the margin, the method and the share at the k it names."""

from medsim.export.pipeline import _recheck_text


def test_recheck_text_names_margin_method_and_share():
    rec = {"margin": 0.00099, "method": "agreement", "images": 1431,
           "by_k": {"1": {"recheck_share": 0.046}, "5": {"recheck_share": 0.131}}}
    assert _recheck_text({"recheck": rec}) == ", fp32 recheck margin 0.00099 (agreement: 13% of top-5 queries)"
    only1 = {**rec, "by_k": {"1": {"recheck_share": 0.046}}}  # a split too small for k = 5
    assert _recheck_text({"recheck": only1}).endswith("(agreement: 5% of top-1 queries)")
    assert "every query (7 validation images" in _recheck_text({"recheck": {**rec, "method": "all", "images": 7}})
    assert _recheck_text({}) == "" and _recheck_text({"recheck": None}) == ""
