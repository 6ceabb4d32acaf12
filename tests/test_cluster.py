"""The repository's Ray cluster files pass the autoscaler schema shipped in the Ray wheel; broken copies fail it.

Offline: fillout_defaults + jsonschema, no cloud account and no Ray instance. Copies go to tmp_path.
"""

import copy
from pathlib import Path

import pytest
import yaml

from ractd import RactdError
from ractd_ray import cluster

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
CLOUD = REPO / "cluster.yaml"
LOCAL = REPO / "cluster-local.yaml"


def _raw(path):
    return yaml.safe_load(path.read_text())


def _write(tmp_path, cfg, name="copy.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("path", [CLOUD, LOCAL], ids=["cluster.yaml", "cluster-local.yaml"])
def test_repository_cluster_files_validate(path):
    cfg = cluster.validate_cluster_config(path)
    assert cfg["cluster_name"] == _raw(path)["cluster_name"]


def test_provider_defaults_are_filled_in(tmp_path):
    """Keys a file leaves out come from the provider's defaults.yaml in the wheel, as `ray up` fills them."""
    aws = cluster.validate_cluster_config(
        _write(tmp_path, {"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"}}, "aws.yaml"),
        project_rules=False)
    assert aws["head_node_type"] in aws["available_node_types"]
    assert aws["max_workers"] >= 0 and aws["worker_start_ray_commands"]
    local = cluster.validate_cluster_config(_write(
        tmp_path, {"cluster_name": "x", "provider": {"type": "local", "head_ip": "h", "worker_ips": []}}, "l.yaml"),
        project_rules=False)
    assert any("ray start --head" in c for c in local["head_start_ray_commands"])


def test_cli_validates_both_files_as_templates(capsys):
    assert cluster.main(["validate", "--template", str(CLOUD), str(LOCAL)]) == 0
    out = capsys.readouterr().out
    assert f"{CLOUD}: valid (aws provider" in out
    assert f"{LOCAL}: valid (local provider" in out
    assert "a template: CHANGE-ME on line(s)" in out


def test_a_file_with_change_me_left_is_refused(tmp_path, capsys):
    assert cluster.main(["validate", str(CLOUD)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {CLOUD}: CHANGE-ME left on line(s) ") and err.count("\n") == 1
    edited = tmp_path / "cluster.yaml"
    edited.write_text(CLOUD.read_text().replace("CHANGE-ME-ractd-bucket", "my-bucket")
                      .replace("CHANGE-ME-ACCOUNT-ID", "123456789012"))
    assert cluster.main(["validate", str(edited)]) == 0
    assert cluster.storage_bucket(_raw(edited)) == "my-bucket"


def test_worker_profiles_need_a_head_that_can_pass_them(tmp_path):
    """Ray's default head role has no iam:PassRole: worker node types with a profile need a head profile
    (ray-project/ray #3190, #9327)."""
    cfg = _raw(CLOUD)
    del cfg["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]
    with pytest.raises(RactdError, match=r"gpu_\w+\.node_config\.IamInstanceProfile: the head names no instance "
                                         r"profile.*iam:PassRole"):
        cluster.validate_cluster_config(_write(tmp_path, cfg))
    for name in ("gpu_v100", "gpu_a10g"):  # workers without a profile (no S3 of their own) pass this rule
        del cfg["available_node_types"][name]["node_config"]["IamInstanceProfile"]
    cluster.validate_cluster_config(_write(tmp_path, cfg, "noprofiles.yaml"))


def test_iam_roles_let_the_head_pass_exactly_the_workers_role(monkeypatch, capsys):
    """`iam --apply` against moto's IAM: both roles and profiles; the head may pass the worker role to EC2 and
    nothing else; the workers may use the bucket only; a second run changes nothing."""
    moto = pytest.importorskip("moto")
    import json

    import boto3

    from ractd_ray import aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-west-2", "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        made = aws.apply("my-bucket")
        again = aws.apply("my-bucket")  # idempotent
        assert made == again
        iam = boto3.client("iam")
        head = iam.get_instance_profile(InstanceProfileName=aws.HEAD)["InstanceProfile"]
        assert made["head_profile"] == head["Arn"] and [r["RoleName"] for r in head["Roles"]] == [aws.HEAD]
        worker = iam.get_instance_profile(InstanceProfileName=aws.WORKER)["InstanceProfile"]
        assert made["worker_profile"] == worker["Arn"]
        policy = iam.get_role_policy(RoleName=aws.HEAD, PolicyName=aws.HEAD)["PolicyDocument"]
        policy = json.loads(policy) if isinstance(policy, str) else policy
        passes = [st for st in policy["Statement"] if st["Action"] == "iam:PassRole"]
        assert passes == [{"Effect": "Allow", "Action": "iam:PassRole",
                           "Resource": aws.role_arn(made["account"], aws.WORKER),
                           "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}}]
        attached = iam.list_attached_role_policies(RoleName=aws.HEAD)["AttachedPolicies"]
        assert [a["PolicyArn"] for a in attached] == [aws.EC2_MANAGED_POLICY]
        wp = iam.get_role_policy(RoleName=aws.WORKER, PolicyName=aws.WORKER)["PolicyDocument"]
        wp = json.loads(wp) if isinstance(wp, str) else wp
        assert {r for st in wp["Statement"] for r in [st["Resource"]]} == {"arn:aws:s3:::my-bucket",
                                                                         "arn:aws:s3:::my-bucket/*"}
        assert iam.list_attached_role_policies(RoleName=aws.WORKER)["AttachedPolicies"] == []
    # the file names the profiles `iam` creates
    raw = _raw(CLOUD)
    assert raw["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"].endswith(
        f":instance-profile/{aws.HEAD}")
    for name in ("gpu_v100", "gpu_a10g"):
        assert raw["available_node_types"][name]["node_config"]["IamInstanceProfile"]["Arn"].endswith(
            f":instance-profile/{aws.WORKER}")
    assert cluster.main(["iam", str(CLOUD), "--bucket", "b"]) == 0
    out = capsys.readouterr().out
    assert "aws iam put-role-policy --role-name ractd-head" in out and "aws iam attach-role-policy" in out
    assert cluster.main(["iam", str(CLOUD)]) == 2  # the bucket is still CHANGE-ME


def test_versions_are_pinned_to_the_tested_ones():
    """The image's Ray is the version setup.cfg pins and the one installed here; the nodes install the pinned
    torch (PyPI's Linux wheel: the CUDA build) before the project."""
    import configparser

    import ray
    import torch

    raw = _raw(CLOUD)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    ray_pin = [line.strip() for line in cfg["options.extras_require"]["ray"].splitlines() if line.startswith("ray")]
    assert ray_pin == [f"ray[default,tune,train]=={ray.__version__}"]
    assert raw["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    torch_version = torch.__version__.split("+")[0]
    assert raw["setup_commands"][0] == f"pip install --quiet 'torch=={torch_version}'"
    assert ".[ray,locomotion]" in raw["setup_commands"][1]


def test_live_check_on_a_local_ray(monkeypatch, tmp_path, capsys):
    """`check` on one machine with a storage folder: the node types, the probe writes and reads storage."""
    monkeypatch.setenv(cluster.STORAGE_ENV, str(tmp_path / "storage"))
    assert cluster.main(["check", "--address", "local", "--gpu", "no", "--timeout", "120"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok   node types: node ") and "(no autoscaler)" in out[0]
    assert out[1].startswith(f"ok   storage: {tmp_path / 'storage'}: node ") and "read back" in out[1]
    assert out[2] == "ok   GPU: not checked (--gpu no)"
    monkeypatch.delenv(cluster.STORAGE_ENV)
    assert cluster.main(["check", "--address", "local", "--gpu", "no"]) == 0  # one machine needs no storage
    assert "storage: RACTD_STORAGE_PATH is not set (one machine: run folders)" in capsys.readouterr().out


def test_cloud_file_shape():
    """CPU head, autoscaling GPU workers from zero, the Ray 2.60 GPU image, the project installed, S3 storage."""
    cfg = cluster.validate_cluster_config(CLOUD)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] >= 1
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1, name
        assert t["min_workers"] == 0, name
        assert t["max_workers"] >= 1, name
        assert t["node_config"]["InstanceType"] in {"p3.2xlarge", "g5.xlarge"}, name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("pip install" in c and ".[ray,locomotion]" in c for c in cfg["setup_commands"])
    assert any(f"--env {cluster.STORAGE_ENV}=s3://" in o for o in cfg["docker"]["run_options"])


def test_local_file_shape():
    raw = _raw(LOCAL)
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert "available_node_types" not in raw
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert f"{cluster.STORAGE_ENV}=/mnt/shared" in command and "RACTD_CACHE_DIR=/mnt/shared" in command


@pytest.mark.parametrize("where", ["top", "node_type", "docker"])
def test_unknown_key_fails(tmp_path, where):
    cfg = _raw(CLOUD)
    target = {"top": cfg, "node_type": cfg["available_node_types"]["gpu_v100"], "docker": cfg["docker"]}[where]
    target["bogus_key"] = 1
    with pytest.raises(RactdError, match=r"'bogus_key' was unexpected") as info:
        cluster.validate_cluster_config(_write(tmp_path, cfg))
    assert "\n" not in str(info.value)


def test_unknown_key_in_local_file_fails(tmp_path):
    cfg = _raw(LOCAL)
    cfg["setup_command"] = []  # a typo of setup_commands
    with pytest.raises(RactdError, match=r"'setup_command' was unexpected"):
        cluster.validate_cluster_config(_write(tmp_path, cfg))


def test_fractional_resource_fails_naming_the_key(tmp_path):
    cfg = _raw(CLOUD)
    cfg["available_node_types"]["gpu_v100"]["resources"]["GPU"] = 0.5
    with pytest.raises(RactdError, match=r"available_node_types\.gpu_v100\.resources\.GPU: 0\.5 is not of type "
                                         r"'integer'"):
        cluster.validate_cluster_config(_write(tmp_path, cfg))


def test_negative_resource_fails(tmp_path):
    cfg = _raw(CLOUD)
    cfg["available_node_types"]["head"]["resources"]["CPU"] = -1
    with pytest.raises(RactdError, match=r"available_node_types\.head\.resources\.CPU"):
        cluster.validate_cluster_config(_write(tmp_path, cfg))


def test_cross_field_rules(tmp_path):
    cfg = _raw(CLOUD)
    bad_head = copy.deepcopy(cfg)
    bad_head["head_node_type"] = "nope"
    with pytest.raises(RactdError, match=r"head_node_type: 'nope' is not one of available_node_types"):
        cluster.validate_cluster_config(_write(tmp_path, bad_head, "head.yaml"))
    too_many = copy.deepcopy(cfg)
    too_many["available_node_types"]["gpu_v100"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(RactdError, match=r"max_workers: .* below the sum"):
        cluster.validate_cluster_config(_write(tmp_path, too_many, "min.yaml"))
    local = _raw(LOCAL)
    local["available_node_types"] = copy.deepcopy(cfg["available_node_types"])
    with pytest.raises(RactdError, match=r"available_node_types: not allowed with the local provider"):
        cluster.validate_cluster_config(_write(tmp_path, local, "local.yaml"))


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster_name: x\nprovider: [unclosed\n")
    assert cluster.main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not valid YAML" in err and err.count("\n") == 1
    with pytest.raises(RactdError, match=r"provider\.type"):
        cluster.validate_cluster_config(_write(tmp_path, {"cluster_name": "x"}, "noprov.yaml"))
    with pytest.raises(RactdError, match=r"cannot read"):
        cluster.validate_cluster_config(tmp_path / "missing.yaml")


def test_storage_location_is_the_cluster_storage_when_set_else_the_local_folder(monkeypatch, tmp_path):
    from ractd import storage

    monkeypatch.delenv(cluster.STORAGE_ENV, raising=False)
    assert storage.configured() is None
    assert storage.location("sweeps/x", tmp_path) == str(tmp_path)
    assert storage.folder_location("runs", tmp_path / "a") == str(tmp_path / "a" / "ray")
    monkeypatch.setenv(cluster.STORAGE_ENV, "s3://bucket/prefix/")
    assert storage.location("sweeps/x", tmp_path) == "s3://bucket/prefix/sweeps/x"
    # two run folders of one name (different parents) get different storage
    one, two = storage.folder_location("runs", tmp_path / "p" / "a"), storage.folder_location("runs", tmp_path / "a")
    assert one.startswith("s3://bucket/prefix/runs/a-") and two.startswith("s3://bucket/prefix/runs/a-") and one != two


def test_project_rules_shared_storage_and_extras(tmp_path):
    """This project's own rules: a multi-node file sets RACTD_STORAGE_PATH; the nodes install .[ray,locomotion]."""
    cfg = _raw(CLOUD)
    no_storage = copy.deepcopy(cfg)
    no_storage["docker"]["run_options"] = [o for o in cfg["docker"]["run_options"] if "RACTD_STORAGE_PATH" not in o]
    with pytest.raises(RactdError, match=r"multi-node cluster needs shared storage: set RACTD_STORAGE_PATH"):
        cluster.validate_cluster_config(_write(tmp_path, no_storage, "nostore.yaml"))
    single = copy.deepcopy(no_storage)  # a head-only cluster needs no shared storage
    for name, t in single["available_node_types"].items():
        if name != single["head_node_type"]:
            t["max_workers"] = 0
    cluster.validate_cluster_config(_write(tmp_path, single, "single.yaml"))
    ray_only = copy.deepcopy(cfg)
    ray_only["setup_commands"] = ["cd ~/ractd && pip install --quiet -e '.[ray]'"]
    with pytest.raises(RactdError, match=r"install \.\[ray\] without locomotion \(stable-baselines3"):
        cluster.validate_cluster_config(_write(tmp_path, ray_only, "rayonly.yaml"))
    local = _raw(LOCAL)
    local["setup_commands"] = ["echo nothing"]
    with pytest.raises(RactdError, match=r"setup_commands: no `pip install -e"):
        cluster.validate_cluster_config(_write(tmp_path, local, "noinstall.yaml"))
    assert cluster.installed_extras(cluster.validate_cluster_config(LOCAL)) == {"ray", "locomotion"}
