use super::*;

fn parse(vars: &[(&str, &str)]) -> Result<DistEnv> {
    DistEnv::from_vars(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
}

/// (name, vars, expected (rank, world, local_rank, local_world, node, addr, port, source)).
/// (name, variables, expectation).
type Case<W> = (&'static str, Vec<(&'static str, &'static str)>, W);

type Want = (
    usize,
    usize,
    usize,
    usize,
    usize,
    &'static str,
    u16,
    EnvSource,
);

#[test]
fn detects_every_launcher() {
    use EnvSource::*;
    let cases: Vec<Case<Want>> = vec![
        (
            "nothing",
            vec![],
            (0, 1, 0, 1, 0, "127.0.0.1", 29500, Single),
        ),
        (
            "bellows",
            vec![
                ("BELLOWS_JOB_TOKEN", "t"),
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "1"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("NODE_RANK", "1"),
                ("MASTER_ADDR", "10.0.0.1"),
                ("MASTER_PORT", "4000"),
            ],
            (3, 4, 1, 2, 1, "10.0.0.1", 4000, Bellows),
        ),
        (
            "torchrun",
            vec![
                ("TORCHELASTIC_RUN_ID", "x"),
                ("RANK", "5"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("LOCAL_WORLD_SIZE", "4"),
                ("GROUP_RANK", "1"),
                ("GROUP_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h0"),
                ("MASTER_PORT", "29400"),
                // Slurm variables around torchrun must not win.
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
            ],
            (5, 8, 1, 4, 1, "h0", 29400, Torchrun),
        ),
        (
            "bare rank/world",
            vec![("RANK", "1"), ("WORLD_SIZE", "2")],
            (1, 2, 1, 2, 0, "127.0.0.1", 29500, Torchrun),
        ),
        (
            "slurm",
            vec![
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "7"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NODEID", "3"),
                ("SLURM_TASKS_PER_NODE", "2(x2),1(x3)"),
                ("SLURM_JOB_NODELIST", "gpu[01-04,07],cpu3"),
                ("SLURM_JOB_ID", "8812345"),
            ],
            (5, 7, 0, 1, 3, "gpu01", 17345, Slurm),
        ),
        (
            "slurm with master override",
            vec![
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_NODEID", "0"),
                ("SLURM_NTASKS_PER_NODE", "2"),
                ("MASTER_ADDR", "m"),
                ("MASTER_PORT", "1234"),
            ],
            (1, 2, 1, 2, 0, "m", 1234, Slurm),
        ),
        (
            "kubeflow",
            vec![
                ("PET_NNODES", "2"),
                ("PET_NPROC_PER_NODE", "4"),
                ("RANK", "1"),
                ("LOCAL_RANK", "2"),
                ("MASTER_ADDR", "job-master-0"),
                ("WORLD_SIZE", "2"),
            ],
            (6, 8, 2, 4, 1, "job-master-0", 23456, Kubeflow),
        ),
        (
            "kubeflow trainer v2",
            vec![
                ("PET_NNODES", "3:3"),
                ("PET_NPROC_PER_NODE", "1"),
                ("PET_NODE_RANK", "2"),
                ("PET_MASTER_ADDR", "n0"),
                ("PET_MASTER_PORT", "29400"),
            ],
            (2, 3, 0, 1, 2, "n0", 29400, Kubeflow),
        ),
        (
            "openmpi",
            vec![
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                ("MASTER_ADDR", "h"),
            ],
            (3, 4, 1, 2, 1, "h", 29500, OpenMpi),
        ),
        (
            "openmpi single node",
            vec![
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ],
            (1, 2, 1, 2, 0, "127.0.0.1", 29500, OpenMpi),
        ),
    ];
    for (name, vars, want) in cases {
        let e = parse(&vars).unwrap_or_else(|err| panic!("{name}: {err}"));
        let got = (
            e.rank,
            e.world_size,
            e.local_rank,
            e.local_world_size,
            e.node_rank,
            e.master_addr.as_str(),
            e.master_port,
            e.source,
        );
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn inconsistent_values_name_the_variable() {
    let cases: Vec<Case<&str>> = vec![
        (
            "rank >= world",
            vec![("RANK", "2"), ("WORLD_SIZE", "2")],
            "RANK",
        ),
        (
            "world 0",
            vec![("RANK", "0"), ("WORLD_SIZE", "0")],
            "WORLD_SIZE",
        ),
        (
            "not a number",
            vec![("RANK", "x"), ("WORLD_SIZE", "2")],
            "RANK",
        ),
        ("missing world", vec![("RANK", "0")], "WORLD_SIZE"),
        (
            "bad port",
            vec![("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")],
            "MASTER_PORT",
        ),
        (
            "local rank too big",
            vec![
                ("RANK", "1"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "2"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
            ],
            "LOCAL_RANK",
        ),
        (
            "torchrun layout",
            vec![
                ("GROUP_RANK", "1"),
                ("RANK", "1"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "1"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
            ],
            "GROUP_RANK",
        ),
        (
            "torchrun group world",
            vec![
                ("GROUP_RANK", "0"),
                ("RANK", "0"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("GROUP_WORLD_SIZE", "3"),
                ("MASTER_ADDR", "h"),
            ],
            "GROUP_WORLD_SIZE",
        ),
        (
            "multi-node without master",
            vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_WORLD_SIZE", "2"),
            ],
            "MASTER_ADDR",
        ),
        (
            "bellows missing node rank",
            vec![
                ("BELLOWS_JOB_TOKEN", "t"),
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("LOCAL_RANK", "0"),
                ("LOCAL_WORLD_SIZE", "1"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "NODE_RANK",
        ),
        (
            "slurm tasks disagree",
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "4"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NODEID", "0"),
                ("SLURM_TASKS_PER_NODE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "SLURM_TASKS_PER_NODE",
        ),
        (
            "slurm bad nodelist",
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NODEID", "0"),
                ("SLURM_TASKS_PER_NODE", "1"),
                ("SLURM_JOB_NODELIST", "gpu[01"),
                ("SLURM_JOB_ID", "5"),
            ],
            "SLURM_JOB_NODELIST",
        ),
        (
            "slurm without job id",
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NODEID", "0"),
                ("SLURM_TASKS_PER_NODE", "1"),
                ("SLURM_JOB_NODELIST", "a1"),
            ],
            "SLURM_JOB_ID",
        ),
        (
            "slurm rank too big",
            vec![
                ("SLURM_PROCID", "2"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_NODEID", "1"),
                ("SLURM_TASKS_PER_NODE", "1(x2)"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "SLURM_PROCID",
        ),
        (
            "kubeflow elastic",
            vec![("PET_NNODES", "1:4"), ("MASTER_ADDR", "h")],
            "PET_NNODES",
        ),
        (
            "kubeflow needs local rank",
            vec![
                ("PET_NNODES", "1"),
                ("PET_NPROC_PER_NODE", "2"),
                ("MASTER_ADDR", "h"),
            ],
            "LOCAL_RANK",
        ),
        (
            "kubeflow node rank",
            vec![
                ("PET_NNODES", "2"),
                ("PET_NODE_RANK", "2"),
                ("MASTER_ADDR", "h"),
            ],
            "PET_NODE_RANK",
        ),
        (
            "kubeflow master",
            vec![("PET_NNODES", "2"), ("PET_NODE_RANK", "1")],
            "MASTER_ADDR",
        ),
        (
            "openmpi multi-node master",
            vec![
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ],
            "MASTER_ADDR",
        ),
        (
            "openmpi local size",
            vec![
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "0"),
                ("MASTER_ADDR", "h"),
            ],
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        (
            "torchrun port 65535",
            vec![("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "65535")],
            "MASTER_PORT",
        ),
    ];
    for (name, vars, var) in cases {
        match parse(&vars) {
            Err(Error::Env { var: got, message }) => assert_eq!(got, var, "{name}: {message}"),
            other => panic!("{name}: expected an error naming {var}, got {other:?}"),
        }
    }
}

#[test]
fn empty_values_count_as_unset_and_store_port_rule() {
    let e = parse(&[("RANK", ""), ("WORLD_SIZE", " ")]).expect("empty vars mean single");
    assert_eq!(e.source, EnvSource::Single);
    let t =
        parse(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "29500")]).expect("torchrun");
    assert_eq!(t.store_port(), 29501);
    assert!(t.rank0_hosts_store());
    let b = parse(&[
        ("BELLOWS_JOB_TOKEN", "tok"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("NODE_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "4000"),
    ])
    .expect("bellows");
    assert_eq!(
        (
            b.store_port(),
            b.rank0_hosts_store(),
            b.job_token.as_deref()
        ),
        (4000, false, Some("tok"))
    );
}
