"""The medvlp contract suite on the installed plugin, by its registered name."""
from medvlp.testing import check_method


def test_siglip_meets_the_medvlp_contract(tmp_path):
    assert check_method("siglip", tmp_dir=tmp_path)
