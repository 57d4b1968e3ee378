"""Launch configuration choice: tuned-table look-up (exact and nearest), heuristic, launchable set."""

import itertools
import re

import pytest
import torch

from nn_blocksparse.kernels import configs
from nn_blocksparse.kernels.configs import KernelConfig, heuristic_config, launchable_configs, table_key


@pytest.fixture
def tuned_table(monkeypatch):
    table = {"sm90": {
        table_key(torch.float16, 32, 768, 768, 2048, 0.5): [128, 8, 1, 8, 4],
        table_key(torch.float16, 32, 768, 768, 128, 0.5): [32, 8, 2, 4, 3],
    }}
    monkeypatch.setattr(configs, "load_tuned_table", lambda: table)
    return table


def test_exact_and_nearest_tuned_entries(tuned_table):
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 2048, 0.5) == KernelConfig(128, 8, 1, 8, 4)
    # M=1500 falls in the 2048 bucket; density 0.52 rounds to 0.50.
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 1500, 0.52) == KernelConfig(128, 8, 1, 8, 4)
    # No exact key: nearest M bucket of the same shape wins (256 is nearer to 128 than to 2048)...
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 256, 0.3) == KernelConfig(32, 8, 2, 4, 3)
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 1024, 0.5) == KernelConfig(128, 8, 1, 8, 4)
    # 512 is two buckets from both entries: the larger M wins; 8192 is two from 2048.
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 512, 0.5) == KernelConfig(128, 8, 1, 8, 4)
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 8192, 0.5) == KernelConfig(128, 8, 1, 8, 4)
    # ...but no further: 16 is three buckets from 128, the heuristic decides.
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 16, 0.5) is None
    # Another shape, dtype or architecture: nothing tuned.
    assert configs.tuned_config("sm90", torch.float16, 32, 3072, 768, 2048, 0.5) is None
    assert configs.tuned_config("sm90", torch.bfloat16, 32, 768, 768, 2048, 0.5) is None
    assert configs.tuned_config("sm80", torch.float16, 32, 768, 768, 2048, 0.5) is None


def test_nearest_entry_ties_go_to_the_larger_m(monkeypatch):
    table = {"sm90": {table_key(torch.float16, 32, 768, 768, 128, 0.5): [16, 8, 1, 4, 3],
                      table_key(torch.float16, 32, 768, 768, 512, 0.5): [64, 8, 1, 4, 3]}}
    monkeypatch.setattr(configs, "load_tuned_table", lambda: table)
    assert configs.tuned_config("sm90", torch.float16, 32, 768, 768, 256, 0.5) == KernelConfig(64, 8, 1, 4, 3)


def test_heuristic_grows_tiles_with_m_and_splits_k_when_the_grid_is_small():
    small = heuristic_config(torch.float16, 32, m=16, n_block_rows=24, nnz_blocks=24 * 96)
    large = heuristic_config(torch.float16, 32, m=8192, n_block_rows=24, nnz_blocks=24 * 96)
    assert small.block_m == 16 and large.block_m == 128
    # 24 tiles cannot fill 108 SMs: split, as long as each split keeps 4 steps of 4 blocks.
    assert small.k_blocks == 4 and small.split_k == 4
    assert large.split_k == 1 and large.k_blocks == 1  # 64 x 24 tiles already fill it; large M steps one block
    # Rows of 12 blocks are 3 steps: not split.
    assert heuristic_config(torch.float16, 32, m=16, n_block_rows=24, nnz_blocks=24 * 12).split_k == 1
    # Never split below 2 blocks per program.
    assert heuristic_config(torch.float16, 32, m=16, n_block_rows=24, nnz_blocks=24).split_k == 1
    # fp32 with 64-wide blocks stops at 32 rows: larger tiles spill (see the aot report).
    assert heuristic_config(torch.float32, 64, m=8192, n_block_rows=12, nnz_blocks=100).block_m == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_every_heuristic_choice_is_in_the_launchable_set(dtype, block_size):
    launchable = set(launchable_configs(dtype, block_size))
    for m in (1, 7, 16, 100, 128, 129, 512, 2048, 8192):
        for n_block_rows, nnz in ((1, 0), (4, 4), (24, 24 * 6), (96, 96 * 20)):
            for sm_count, inflation in itertools.product((8, 108, 132), ((), ((2, 1.0), (4, 1.0)), ((2, 1.0), (4, 1.5)))):
                assert heuristic_config(dtype, block_size, m, n_block_rows, nnz, sm_count, inflation) in launchable


def test_heuristic_groups_rows_only_where_padding_is_small_and_the_grid_stays_full():
    free = ((2, 1.0), (4, 1.0))
    wide = heuristic_config(torch.float16, 32, m=16384, n_block_rows=24, nnz_blocks=24 * 24, grouping_inflation=free)
    assert wide.rows_per_program == 4 and wide.split_k == 1 and wide.block_m * 4 * 32 <= 128 * 128
    # Row groups keep 4 programs per SM at their full 128-row tile: 8192 rows make 64 x 6 groups of 4
    # (too few for 108 SMs) or 64 x 12 groups of 2 (enough); at 2048 rows neither, and shrinking
    # the tile instead measured up to 2x slower than one block-row per program on an H200.
    assert heuristic_config(torch.float16, 32, 8192, 24, 24 * 24, grouping_inflation=free).rows_per_program == 2
    at_2048 = heuristic_config(torch.float16, 32, 2048, 24, 24 * 24, grouping_inflation=free)
    assert at_2048.rows_per_program == 1 and at_2048.block_m == 64
    # Padding: R = 4 would cost 50% more products, R = 2 only 3%.
    assert heuristic_config(torch.bfloat16, 32, 8192, 24, 24 * 24,
                            grouping_inflation=((2, 1.03), (4, 1.5))).rows_per_program == 2
    assert heuristic_config(torch.float16, 32, 4096, 24, 24 * 12,
                            grouping_inflation=((2, 1.4), (4, 1.9))).rows_per_program == 1
    # Small M, fp32, or no grouping information: one block-row per program, as before.
    assert heuristic_config(torch.float16, 32, 128, 24, 24 * 24, grouping_inflation=free).rows_per_program == 1
    assert heuristic_config(torch.float32, 32, 4096, 24, 24 * 24, grouping_inflation=free).rows_per_program == 1
    assert heuristic_config(torch.float16, 32, 4096, 24, 24 * 24).rows_per_program == 1


def test_the_256_wide_row_group_launches_only_when_asked_for():
    """R = 8 compiles without spills (the AOT check covers it) but no GPU has timed it yet."""
    wide = KernelConfig(block_m=64, num_warps=8, rows_per_program=8)
    assert wide in launchable_configs(torch.float16, 32)
    free = ((2, 1.0), (4, 1.0), (8, 1.0))
    chosen = heuristic_config(torch.float16, 32, 16384, 96, 96 * 24, 132, free)
    assert chosen.rows_per_program == 4  # 8 would have the grid too, but stays out of the heuristic's choice
    with pytest.raises(ValueError, match="rows_per_program"):
        KernelConfig(rows_per_program=16)


def test_select_config_reads_the_layout_of_a_real_matrix():
    from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix

    dense = BlockSparseMatrix.from_dense(torch.randn(768, 768, dtype=torch.float16), 32)
    args = (torch.float16, 32, 768, 768, 16384, dense.nnz_blocks, torch.device("cpu"))
    assert configs.select_config(*args, dense.grouping_inflation()).rows_per_program == 4
    assert configs.select_config(*args).rows_per_program == 1


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(block_m=48)
    with pytest.raises(ValueError, match="split_k"):
        KernelConfig(split_k=3)
    with pytest.raises(ValueError, match="rows_per_program"):
        KernelConfig(rows_per_program=3)
    with pytest.raises(ValueError, match="group_m must be one of"):
        KernelConfig(group_m=2**30)  # GROUP_M * groups would overflow the kernel's int32 program ids
    with pytest.raises(ValueError, match="num_stages must be in"):
        KernelConfig(num_stages=100)
    with pytest.raises(ValueError, match="num_warps"):
        KernelConfig(num_warps=3)


def test_the_shipped_tuned_table_passes_its_checks():
    import json

    table = json.loads(configs.TUNED_TABLE_PATH.read_text())
    assert configs.check_tuned_table(table) == table["configs"] and table["configs"]



@pytest.fixture
def user_table(tmp_path, monkeypatch):
    """Writes a table file, names it in NN_BLOCKSPARSE_TUNED_CONFIGS, and reloads the table around the test."""
    def write(table) -> str:
        import json

        file = tmp_path / "my_tuned.json"
        file.write_text(table if isinstance(table, str) else json.dumps(table))
        monkeypatch.setenv(configs.TUNED_CONFIGS_ENV, str(file))
        configs.load_tuned_table.cache_clear()
        return str(file)

    yield write
    configs.load_tuned_table.cache_clear()


def test_a_table_named_in_the_environment_is_laid_over_the_bundled_one(user_table):
    import json

    bundled = json.loads(configs.TUNED_TABLE_PATH.read_text())["configs"]["sm90"]
    replaced, kept = sorted(bundled)[:2]
    mine = KernelConfig(16, 8, 2, 4, 3)
    added = table_key(torch.float16, 32, 64, 64, 16, 0.5)
    user_table({"configs": {"sm90": {replaced: mine.as_list()}, "interpreter": {added: mine.as_list()}}})
    table = configs.load_tuned_table()
    assert table["sm90"][replaced] == mine.as_list() != bundled[replaced]  # the user's entry wins
    assert table["sm90"][kept] == bundled[kept] and len(table["sm90"]) == len(bundled)  # the rest stays
    assert configs.tuned_config("interpreter", torch.float16, 32, 64, 64, 16, 0.5) == mine
    assert mine in launchable_configs(torch.float16, 32)  # so the AOT check compiles it
    assert configs.load_tuned_table(str(configs.TUNED_TABLE_PATH))["sm90"] == bundled  # one file alone


def test_a_bad_table_named_in_the_environment_is_refused_naming_it(user_table, tmp_path, monkeypatch):
    path = user_table({"configs": {"sm90": {GOOD_KEY: [48, 8, 1, 4, 3]}}})
    with pytest.raises(ValueError, match=f"{configs.TUNED_CONFIGS_ENV}={re.escape(path)}: bad entry sm90/{GOOD_KEY}"):
        configs.load_tuned_table()
    user_table("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        configs.load_tuned_table()
    monkeypatch.setenv(configs.TUNED_CONFIGS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="names no file"):
        configs.load_tuned_table()


GOOD_KEY = "fp16/bs32/n768/k3072/m128/d0.35"


@pytest.mark.parametrize("arch, key, values, message", [
    ("sm90", GOOD_KEY, [64, 8, 1, 4], "a list of 5 to 7 ints"),
    ("sm90", GOOD_KEY, [64, 8, 1, 4, 3, 1, 2, 9], "a list of 5 to 7 ints"),
    ("sm90", GOOD_KEY, [64, 8, 1, 4, "3"], "a list of 5 to 7 ints"),
    ("sm90", GOOD_KEY, [64, 8, 1, 4, True], "a list of 5 to 7 ints"),
    ("sm90", GOOD_KEY, [48, 8, 1, 4, 3], "block_m must be one of"),
    ("sm90", GOOD_KEY, [64, 8, 2, 4, 3, 2, 2], "k_blocks > 1 needs rows_per_program = 1"),
    ("sm90", "fp16/bs32/n768/k3072/m128", [64, 8, 1, 4, 3], "the key must read"),
    ("sm90", "fp64/bs32/n768/k3072/m128/d0.35", [64, 8, 1, 4, 3], "the key must read"),
    ("sm90", "fp16/bs24/n768/k3072/m128/d0.35", [64, 8, 1, 4, 3], "block size 24 must be a power of two"),
    ("sm90", "fp16/bs32/n770/k3072/m128/d0.35", [64, 8, 1, 4, 3], "dividing n = 770"),
    ("sm90", "fp16/bs32/n768/k3072/m100/d0.35", [64, 8, 1, 4, 3], "m = 100 is not an M bucket"),
    ("sm90", "fp16/bs32/n768/k3072/m128/d1.50", [64, 8, 1, 4, 3], "density 1.50 is outside"),
    ("gpu0", GOOD_KEY, [64, 8, 1, 4, 3], "must be a GPU architecture"),
])
def test_a_bad_tuned_entry_is_refused_at_load_naming_it(tmp_path, arch, key, values, message):
    import json

    table = {"configs": {arch: {"fp16/bs32/n768/k768/m128/d0.50": [64, 8, 1, 4, 3], key: values}}}
    file = tmp_path / "tuned.json"
    file.write_text(json.dumps(table))
    try:
        with pytest.raises(ValueError, match=message) as error:
            configs.load_tuned_table(str(file))
    finally:
        configs.load_tuned_table.cache_clear()
    if arch == "sm90":
        assert f"bad entry sm90/{key}" in str(error.value) and str(file) in str(error.value)
    file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        configs.load_tuned_table(str(file))


def test_table_entries_round_trip_and_old_five_entry_rows_mean_one_row_per_program():
    config = KernelConfig(128, 8, 1, 8, 3, rows_per_program=4)
    assert KernelConfig.from_list(config.as_list()) == config
    assert KernelConfig.from_list([64, 8, 2, 4, 3]) == KernelConfig(64, 8, 2, 4, 3, rows_per_program=1)


def test_heuristic_reproduces_the_h200_tuning_where_it_was_measured():
    """Graph-timed H200 tuning (benchmarks/results/nvidia-h200/tune_cudagraph_nvidia-h200.csv): at M = 128 the
    best configs step several blocks at a time on 32-64-row tiles (M = 512 too: the
    tune_heuristic_m*_cudagraph logs time these picks); at M = 2048 one block at a time, and row
    groups only with a full grid at the full tile."""
    from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
    from nn_blocksparse.layouts import random_block_sparse_weight

    def heuristic_for(n, k, m, density):
        weight = random_block_sparse_weight(n, k, 32, density, seed=0, dtype=torch.float16)
        matrix = BlockSparseMatrix.from_dense(weight, 32)
        return heuristic_config(torch.float16, 32, m, matrix.block_rows, matrix.nnz_blocks, 132,
                                matrix.grouping_inflation()).as_list()

    for density in (0.1, 0.36, 0.5, 0.75, 1.0):  # the tuned best at all five
        assert heuristic_for(768, 768, 128, density) == [32, 8, 1, 4, 3, 1, 4]
    assert heuristic_for(2304, 768, 128, 0.36) == [64, 8, 1, 4, 3, 1, 2]
    assert heuristic_for(768, 3072, 128, 0.1) == [32, 8, 1, 4, 3, 1, 4]
    assert heuristic_for(768, 3072, 128, 0.36) == [64, 8, 4, 4, 3, 1, 2]  # long rows: split K, keep 64 rows
    assert heuristic_for(2304, 768, 2048, 1.0) == [128, 8, 1, 4, 3, 2]
    assert heuristic_for(3072, 768, 2048, 0.5) == [128, 8, 1, 4, 3, 1]
    # M = 512 on 768-wide outputs: 64-row tiles two blocks deep (the one-block rule gave 16-row tiles,
    # 1.2-1.3x slower). Timed in tune_heuristic_m512_cudagraph: 1.01x and 1.00x of the tuned best.
    assert heuristic_for(768, 768, 512, 0.36) == [64, 8, 1, 4, 3, 1, 2]
    assert heuristic_for(768, 3072, 512, 0.1) == [64, 8, 1, 4, 3, 1, 2]


def test_heuristic_steps_64_wide_blocks_two_at_a_time_at_small_m():
    """A 64-row tile cannot step two 64-wide blocks (its x tile would spill): 32 rows, not one block per step."""
    assert heuristic_config(torch.float16, 64, m=128, n_block_rows=12, nnz_blocks=12 * 48, sm_count=132) == \
        KernelConfig(32, 8, 4, 4, 3, k_blocks=2)
    assert heuristic_config(torch.bfloat16, 64, m=256, n_block_rows=36, nnz_blocks=36 * 12, sm_count=132).k_blocks == 2
