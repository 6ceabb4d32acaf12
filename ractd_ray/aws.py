"""The AWS roles cluster.yaml needs, created once per account: `python -m ractd_ray.cluster iam cluster.yaml --apply`.

Why. Ray's cluster launcher gives the head a role of its own (ray-autoscaler-v1: EC2 and S3 full access) when the
head's node_config names none, and the workers none. The workers write checkpoints to S3 themselves, so they need an
instance profile; but launching an instance with a profile needs iam:PassRole on the profile's role, which Ray's
head role lacks -- RunInstances is refused and no worker ever starts (ray-project/ray #3190, #3199, #9327). So the
project names both profiles itself:

- ractd-head (HEAD): the autoscaler's EC2 calls (the AmazonEC2FullAccess managed policy, as Ray's own head role;
  the narrower lists of #9327 broke across Ray versions), the run storage's bucket, and iam:PassRole on exactly
  the worker role, only to EC2;
- ractd-worker (WORKER): the run storage's bucket, nothing else.

Each role has an instance profile of the same name; cluster.yaml's head and worker node types name them
(`ractd_ray.cluster.validate` refuses worker profiles without a head profile that can pass them). The account that
runs `ray up` needs iam:PassRole on both (an administrator has it). `iam_plan` is the list of IAM calls; `apply`
makes them with boto3, idempotently (a second run changes nothing it created); without --apply the command prints
the equivalent `aws iam` commands.
"""

from __future__ import annotations

import json
from typing import Any

HEAD = "ractd-head"
WORKER = "ractd-worker"
EC2_MANAGED_POLICY = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"

_TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def bucket_policy(bucket: str) -> list[dict]:
    """Statements giving read and write on one bucket (the run storage)."""
    return [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
             "Resource": f"arn:aws:s3:::{bucket}"},
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                           "s3:AbortMultipartUpload"],
             "Resource": f"arn:aws:s3:::{bucket}/*"}]


def role_arn(account: str, name: str) -> str:
    return f"arn:aws:iam::{account}:role/{name}"


def profile_arn(account: str, name: str) -> str:
    return f"arn:aws:iam::{account}:instance-profile/{name}"


def iam_plan(account: str, bucket: str) -> list[tuple[str, dict[str, Any]]]:
    """The IAM calls (boto3 IAM client method, keyword arguments) that create both roles and profiles."""
    head_policy = {"Version": "2012-10-17", "Statement": [
        *bucket_policy(bucket),
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": role_arn(account, WORKER),
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}}]}
    worker_policy = {"Version": "2012-10-17", "Statement": bucket_policy(bucket)}
    calls: list[tuple[str, dict[str, Any]]] = []
    for name, policy in ((WORKER, worker_policy), (HEAD, head_policy)):
        calls += [("create_role", {"RoleName": name, "AssumeRolePolicyDocument": json.dumps(_TRUST),
                                   "Description": "ractd cluster.yaml (python -m ractd_ray.cluster iam)"}),
                  ("put_role_policy", {"RoleName": name, "PolicyName": name, "PolicyDocument": json.dumps(policy)})]
        if name == HEAD:
            calls.append(("attach_role_policy", {"RoleName": name, "PolicyArn": EC2_MANAGED_POLICY}))
        calls += [("create_instance_profile", {"InstanceProfileName": name}),
                  ("add_role_to_instance_profile", {"InstanceProfileName": name, "RoleName": name})]
    return calls


def cli_commands(account: str, bucket: str) -> list[str]:
    """iam_plan as `aws iam` command lines (what the command prints without --apply)."""
    import shlex

    lines = []
    for method, kw in iam_plan(account, bucket):
        args = []
        for k, v in kw.items():
            flag = "--" + "".join("-" + c.lower() if c.isupper() else c for c in k).lstrip("-")
            args += [flag, v]
        lines.append(shlex.join(["aws", "iam", method.replace("_", "-"), *args]))
    return lines


_ALREADY = ("EntityAlreadyExists", "LimitExceeded")  # a role already in its profile answers LimitExceeded


def apply(bucket: str, session=None) -> dict[str, str]:
    """Make iam_plan's calls with boto3 (the account is the caller's, from STS); an entity that exists is left
    as it is, its inline policy rewritten. Returns {"account", "head_profile", "worker_profile"} (ARNs)."""
    import boto3
    from botocore.exceptions import ClientError

    session = session or boto3.session.Session()
    account = session.client("sts").get_caller_identity()["Account"]
    iam = session.client("iam")
    for method, kw in iam_plan(account, bucket):
        try:
            getattr(iam, method)(**kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in _ALREADY:
                raise
    return {"account": account, "head_profile": profile_arn(account, HEAD),
            "worker_profile": profile_arn(account, WORKER)}
