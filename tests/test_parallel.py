import pytest

from megatron_ext.parallel.groups import check_layout
from megatron_ext.parallel.launch import first_host_in_nodelist, launch_info


@pytest.mark.parametrize("nodelist, first", [
    ("node07", "node07"),
    ("gpu[003-007,010]", "gpu003"),
    ("gpu[12,15-16],cpu1", "gpu12"),
    ("a-b-c[0001-0004]", "a-b-c0001"),
])
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert first_host_in_nodelist(nodelist) == first


def test_launch_info_from_slurm_variables():
    info = launch_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "dgx[101-102]", "SLURM_JOB_ID": "4242"})
    assert (info.rank, info.world_size, info.local_rank) == (5, 16, 1)
    assert info.master_addr == "dgx101" and info.master_port == 29500 + 242
    assert info.launcher == "slurm"


def test_torchrun_variables_win_over_slurm_ones():
    # torchrun started by srun: each worker sees both; torchrun's are the real layout.
    info = launch_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h1",
                        "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 8, 3, "torchrun")
    assert (info.master_addr, info.master_port) == ("h1", 1234)


def test_layout_must_divide_world_size():
    assert check_layout(8, 2, 2, 1) == 2
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        check_layout(6, 4, 1, 1)
