"""boto3 (the real AWS SDK for Python, botocore's own `lambda-microvms` 2025-09-09 model) against a
real Cocoon: the driver of test/compat/aws-boto3.test.ts.

Input: the JSON object in the environment variable COCOON_AWS_FLOW:
  api        Cocoon's API root (the endpoint_url)       gateway   the gateway's root URL
  keyId/key  a tenant's API key id and key (the credentials)
  otherKeyId/otherKey  another tenant's                 bundleUri a Cocoon bundle URI (the code artifact)
  imageName  the image to create (one build)            appPort/otherPort  the app's two ports
  hooksPort  where the app answers AWS's hooks          payload   the runHookPayload

It runs named steps in order; a step whose prerequisites failed is skipped. Progress goes to stderr
("step <name>: ok|FAILED|skipped"), and the last stdout line is "RESULT <json>": every step's outcome
and the facts the node test checks again. Exit status 0 only when every step passed.
"""

import datetime
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

import boto3
import botocore.auth
from botocore.config import Config
from botocore.exceptions import ClientError

CFG = json.loads(os.environ["COCOON_AWS_FLOW"])
REGION = "eu-central-2"  # any region: Cocoon accepts every one
BUILD_ROLE = "arn:aws:iam::123456789012:role/cocoon-build"  # required by the model; Cocoon has no IAM
NO_RETRIES = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=120)

facts = {}
outcomes = {}


def client(key_id=None, key=None, **config):
    return boto3.client(
        "lambda-microvms",
        endpoint_url=CFG["api"],
        region_name=REGION,
        aws_access_key_id=key_id or CFG["keyId"],
        aws_secret_access_key=key or CFG["key"],
        config=NO_RETRIES.merge(Config(**config)) if config else NO_RETRIES,
    )


lmv = client()
other = client(CFG["otherKeyId"], CFG["otherKey"])
# The server, not botocore, must refuse out-of-range values: client-side validation off.
unchecked = client(parameter_validation=False)


def step(name, needs=()):
    def run(fn):
        missing = [n for n in needs if outcomes.get(n) != "ok"]
        if missing:
            outcomes[name] = "skipped (needs " + ", ".join(missing) + ")"
        else:
            started = time.monotonic()
            try:
                fn()
                outcomes[name] = "ok"
            except Exception as error:  # noqa: BLE001 - every failure is reported, then the next step runs
                outcomes[name] = "FAILED: " + "".join(traceback.format_exception_only(type(error), error)).strip()
                traceback.print_exc(file=sys.stderr)
            print(f"step {name}: {outcomes[name].splitlines()[0]} ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
            return fn
        print(f"step {name}: {outcomes[name]}", file=sys.stderr, flush=True)
        return fn

    return run


def expect_error(code, call, *args, status=None, **kwargs):
    """Calls and answers the ClientError, which must carry `code` (and `status`)."""
    try:
        call(*args, **kwargs)
    except ClientError as error:
        got = error.response["Error"].get("Code")
        http = error.response["ResponseMetadata"].get("HTTPStatusCode")
        assert got == code, f"expected {code}, got {got} (HTTP {http}): {error}"
        if status is not None:
            assert http == status, f"{code}: expected HTTP {status}, got {http}"
        assert error.response["Error"].get("Message"), f"{code} without a message"
        return error
    raise AssertionError(f"expected {code}, the call succeeded")


def wait_until(what, probe, timeout):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)


def gateway(path, token=None, port=None, headers=None, method="GET", body=None, host=None):
    """One request through Cocoon's gateway with AWS's data-plane headers: (status, text)."""
    h = dict(headers or {})
    if token is not None:
        h["X-aws-proxy-auth"] = token
    if port is not None:
        h["X-aws-proxy-port"] = str(port)
    # The microVM is picked by the Host header: the `endpoint` RunMicrovm answered (no wildcard
    # DNS needed: the connection goes to the gateway's address).
    h["Host"] = host or facts["endpointHost"]
    request = urllib.request.Request(CFG["gateway"] + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def microvm_state(microvm_id):
    return lmv.get_microvm(microvmIdentifier=microvm_id)["state"]


def wait_state(microvm_id, states, timeout=300):
    return wait_until(f"{microvm_id} in {states}", lambda: (s if (s := microvm_state(microvm_id)) in states else None), timeout)


def token_for(microvm_id, ports, minutes=10):
    answer = lmv.create_microvm_auth_token(microvmIdentifier=microvm_id, expirationInMinutes=minutes, allowedPorts=ports)
    parts = answer["authToken"]
    assert set(parts) == {"X-aws-proxy-auth"}, f"authToken is {{'X-aws-proxy-auth': token}}, got keys {sorted(parts)}"
    return parts["X-aws-proxy-auth"]


def hooks_log():
    status, text = gateway("/aws-hooks", facts["tokenAll"])
    assert status == 200, f"GET /aws-hooks: HTTP {status} {text}"
    # "<hook> <body>" a line (the test app escapes newlines in bodies).
    return [list(line.partition(" ")[::2]) for line in text.splitlines() if line]


# ---------------------------------------------------------------- images


@step("managed images (paginator)")
def managed_images():
    pages = list(lmv.get_paginator("list_managed_microvm_images").paginate(PaginationConfig={"PageSize": 1}))
    items = [item for page in pages for item in page["items"]]
    assert items, "ListManagedMicrovmImages lists Cocoon's base images"
    if len(items) > 1:
        assert len(pages) >= len(items), f"PageSize 1: one item a page ({len(pages)} pages for {len(items)})"
        assert all(page.get("nextToken") for page in pages[:-1]), "every page but the last has a nextToken"
    facts["managedImages"] = len(items)
    facts["baseImageArn"] = items[0]["imageArn"]


@step("create image from a bundle", needs=["managed images (paginator)"])
def create_image():
    hooks = {
        "port": CFG["hooksPort"],
        "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 600, "validate": "ENABLED", "validateTimeoutInSeconds": 600},
        "microvmHooks": {
            "run": "ENABLED",
            "runTimeoutInSeconds": 30,
            "suspend": "ENABLED",
            "suspendTimeoutInSeconds": 30,
            "resume": "ENABLED",
            "resumeTimeoutInSeconds": 30,
            "terminate": "ENABLED",
            "terminateTimeoutInSeconds": 30,
        },
    }
    answer = lmv.create_microvm_image(
        name=CFG["imageName"],
        baseImageArn=facts["baseImageArn"],
        buildRoleArn=BUILD_ROLE,
        codeArtifact={"uri": CFG["bundleUri"]},
        description="built by boto3",
        hooks=hooks,
        tags={"suite": "boto3"},
    )
    assert answer["name"] == CFG["imageName"]
    assert answer["state"] == "CREATING", answer["state"]
    assert answer["imageArn"].split(":")[2] == "lambda", f"an ARN the model accepts: {answer['imageArn']}"
    assert answer["codeArtifact"]["uri"] == CFG["bundleUri"]
    assert answer["hooks"]["port"] == CFG["hooksPort"]
    assert isinstance(answer["createdAt"], datetime.datetime), "createdAt parsed as a timestamp"
    facts["imageArn"] = answer["imageArn"]
    facts["imageVersion"] = answer["imageVersion"]


@step("wait for CREATED", needs=["create image from a bundle"])
def wait_created():
    def probe():
        image = lmv.get_microvm_image(imageIdentifier=facts["imageArn"])
        return image if image["state"] in ("CREATED", "CREATE_FAILED") else None

    image = wait_until("image CREATED", probe, 900)
    assert image["state"] == "CREATED", f"image {image['state']}: {image}"
    assert image["latestActiveImageVersion"] == facts["imageVersion"], image
    assert image["tags"] == {"suite": "boto3"}, image.get("tags")
    version = lmv.get_microvm_image_version(imageIdentifier=facts["imageArn"], imageVersion=facts["imageVersion"])
    facts["imageVersionState"] = version.get("state")
    builds = list(lmv.get_paginator("list_microvm_image_builds").paginate(imageIdentifier=facts["imageArn"], imageVersion=facts["imageVersion"]))
    facts["builds"] = sum(len(page["items"]) for page in builds)
    images = [item for page in lmv.get_paginator("list_microvm_images").paginate() for item in page["items"]]
    assert facts["imageArn"] in [item.get("imageArn") for item in images], "ListMicrovmImages lists it"


# ---------------------------------------------------------------- microVMs


@step("run", needs=["wait for CREATED"])
def run():
    policy = {"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 3600, "autoResumeEnabled": True}
    answer = lmv.run_microvm(
        imageIdentifier=facts["imageArn"],
        idlePolicy=policy,
        maximumDurationInSeconds=3600,
        runHookPayload=CFG["payload"],
        clientToken="boto3-flow-run-1",
    )
    assert answer["state"] in ("PENDING", "RUNNING"), answer["state"]
    assert answer["imageArn"] == facts["imageArn"]
    assert answer["imageVersion"] == facts["imageVersion"]
    assert answer["idlePolicy"] == policy, answer["idlePolicy"]
    assert answer["maximumDurationInSeconds"] == 3600
    assert isinstance(answer["startedAt"], datetime.datetime)
    facts["microvmId"] = answer["microvmId"]
    endpoint = answer["endpoint"]
    facts["endpoint"] = endpoint
    facts["endpointHost"] = urllib.parse.urlsplit(endpoint if "://" in endpoint else "http://" + endpoint).hostname
    assert facts["microvmId"] in facts["endpointHost"], f"the endpoint is the microVM's gateway host: {endpoint}"
    # clientToken: the same call again is the same microVM.
    again = lmv.run_microvm(
        imageIdentifier=facts["imageArn"], idlePolicy=policy, maximumDurationInSeconds=3600, runHookPayload=CFG["payload"], clientToken="boto3-flow-run-1"
    )
    assert again["microvmId"] == facts["microvmId"], "clientToken makes RunMicrovm idempotent"
    assert wait_state(facts["microvmId"], ("RUNNING",)) == "RUNNING"


@step("auth token and requests through the gateway", needs=["run"])
def data_plane():
    app, second = CFG["appPort"], CFG["otherPort"]
    facts["tokenAll"] = token_for(facts["microvmId"], [{"allPorts": {}}])
    token = token_for(facts["microvmId"], [{"port": app}, {"range": {"startPort": second, "endPort": second}}])
    facts["tokenTwo"] = token
    status, text = gateway("/", token)
    assert (status, text) == (200, "hello from testapp\n"), (status, text)
    assert gateway("/count", token) == (200, "1\n")
    assert gateway("/count", token, port=app) == (200, "2\n"), "X-aws-proxy-port naming the app port"
    facts["count"] = 2


@step("x-aws-proxy-* headers stripped before the guest", needs=["auth token and requests through the gateway"])
def stripped():
    status, headers = gateway("/headers", facts["tokenTwo"], port=CFG["appPort"], headers={"X-aws-proxy-extra": "x", "X-Kept": "kept"})
    assert status == 200, headers
    lowered = headers.lower()
    assert "x-aws-proxy" not in lowered, f"every x-aws-proxy-* header is stripped before the guest:\n{headers}"
    assert "x-kept: kept" in lowered, headers


@step("X-aws-proxy-port: another guest port", needs=["auth token and requests through the gateway"])
def second_port():
    # The app's second listener, a process of its own (its own counter), not the image's port.
    status, text = gateway("/count", facts["tokenTwo"], port=CFG["otherPort"])
    assert (status, text) == (200, "1\n"), f"X-aws-proxy-port picks the guest port: HTTP {status} {text}"
    assert gateway("/count", facts["tokenAll"], port=CFG["otherPort"]) == (200, "2\n"), "allPorts allows it too"


@step("tokens restricted to ports, refused tokens", needs=["auth token and requests through the gateway"])
def token_ports():
    only_app = token_for(facts["microvmId"], [{"port": CFG["appPort"]}])
    assert gateway("/", only_app)[0] == 200
    status, text = gateway("/", only_app, port=CFG["otherPort"])
    assert status == 403, f"a port the token does not allow: HTTP {status} {text}"
    status, _ = gateway("/", "not-a-token")
    assert status == 403, f"an unknown token: HTTP {status}"
    status, _ = gateway("/")
    assert status in (401, 403), f"no token: HTTP {status}"
    # The server checks the model's open limits: token expiry ≤ 60 minutes.
    expect_error("ValidationException", unchecked.create_microvm_auth_token, microvmIdentifier=facts["microvmId"], expirationInMinutes=61, allowedPorts=[{"allPorts": {}}], status=400)


@step("run hook called with the payload", needs=["auth token and requests through the gateway"])
def run_hook():
    log = hooks_log()
    names = [name for name, _ in log]
    facts["hooksAfterRun"] = names
    assert ["run", CFG["payload"]] in log, f"POST /run carried runHookPayload: {log}"
    assert names[:2] == ["ready", "validate"], f"ready and validate ran at build time (their calls are in the snapshot): {names}"


@step("suspend", needs=["run"])
def suspend():
    lmv.suspend_microvm(microvmIdentifier=facts["microvmId"])
    assert wait_state(facts["microvmId"], ("SUSPENDED",)) == "SUSPENDED"


@step("a request wakes it with state kept", needs=["suspend", "auth token and requests through the gateway"])
def wake():
    status, text = gateway("/count", facts["tokenAll"])
    assert (status, text) == (200, "3\n"), f"the counter survived suspend and resume: {(status, text)}"
    assert microvm_state(facts["microvmId"]) == "RUNNING"
    names = [name for name, _ in hooks_log()]
    facts["hooksAfterWake"] = names
    assert "suspend" in names and "resume" in names, f"suspend and resume hooks: {names}"
    assert names.index("suspend") < names.index("resume"), names


@step("list with the paginator (several pages)", needs=["run"])
def list_pages():
    policy = {"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 600, "autoResumeEnabled": True}
    more = [lmv.run_microvm(imageIdentifier=facts["imageArn"], idlePolicy=policy, clientToken=f"boto3-flow-list-{i}")["microvmId"] for i in range(2)]
    facts["extra"] = more
    mine = {facts["microvmId"], *more}
    pages = list(lmv.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 1}))
    items = [item for page in pages for item in page["items"]]
    ids = [item["microvmId"] for item in items]
    assert mine <= set(ids), f"all three listed: {ids}"
    assert len(ids) == len(set(ids)), f"no microVM on two pages: {ids}"
    assert len(pages) >= 3 and all(len(page["items"]) <= 1 for page in pages), [len(p["items"]) for p in pages]
    assert all(page.get("nextToken") for page in pages[:-1]) and not pages[-1].get("nextToken")
    facts["pages"] = len(pages)
    capped = lmv.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 1, "MaxItems": 2}).build_full_result()
    assert len(capped["items"]) == 2 and capped.get("NextToken"), "MaxItems stops after two, with a token to go on"
    by_image = lmv.list_microvms(imageIdentifier=facts["imageArn"], maxResults=50)["items"]
    assert mine <= {item["microvmId"] for item in by_image}
    for item in items:
        assert item["imageArn"] and item["state"] and isinstance(item["startedAt"], datetime.datetime)


@step("tags", needs=["wait for CREATED"])
def tags():
    arn = facts["imageArn"]
    lmv.tag_resource(Resource=arn, Tags={"team": "py", "stage": "test"})
    assert lmv.list_tags(Resource=arn)["Tags"] == {"suite": "boto3", "team": "py", "stage": "test"}
    lmv.untag_resource(Resource=arn, TagKeys=["stage"])
    assert lmv.list_tags(Resource=arn)["Tags"] == {"suite": "boto3", "team": "py"}


# ---------------------------------------------------------------- refusals


@step("bad signature, unknown key, expired request")
def signatures():
    bad = client(CFG["keyId"], CFG["key"] + "x")
    expect_error("InvalidSignatureException", bad.list_microvms, status=403)
    unknown = client("AKIDCOCOONUNKNOWN000", CFG["key"])
    expect_error("UnrecognizedClientException", unknown.list_microvms, status=403)
    # A request signed 20 minutes ago (botocore's clock, as on a skewed machine): stale X-Amz-Date.
    real = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: real(*a, **k) - datetime.timedelta(minutes=20)
    try:
        stale = client()
        expect_error("InvalidSignatureException", stale.list_microvms, status=403)
    finally:
        botocore.auth.get_current_datetime = real
    assert "items" in client().list_microvms(), "the right clock works again"


@step("another tenant's ids", needs=["run"])
def other_tenant():
    ResourceNotFound = other.exceptions.ResourceNotFoundException
    for call, kwargs in [
        (other.get_microvm, {"microvmIdentifier": facts["microvmId"]}),
        (other.suspend_microvm, {"microvmIdentifier": facts["microvmId"]}),
        (other.terminate_microvm, {"microvmIdentifier": facts["microvmId"]}),
        (other.create_microvm_auth_token, {"microvmIdentifier": facts["microvmId"], "expirationInMinutes": 5, "allowedPorts": [{"allPorts": {}}]}),
        (other.get_microvm_image, {"imageIdentifier": facts["imageArn"]}),
        (other.run_microvm, {"imageIdentifier": facts["imageArn"]}),
    ]:
        error = expect_error("ResourceNotFoundException", call, status=404, **kwargs)
        assert isinstance(error, ResourceNotFound), f"{call.__name__}: the modeled exception class"
    assert facts["microvmId"] not in [item["microvmId"] for item in other.list_microvms()["items"]]
    assert microvm_state(facts["microvmId"]) in ("RUNNING", "SUSPENDED"), "untouched by the other tenant"


@step("validation and unknown ids")
def validation():
    expect_error("ResourceNotFoundException", lmv.get_microvm, microvmIdentifier="mvm-doesnotexist", status=404)
    if "imageArn" in facts:
        # maximumDurationInSeconds ≤ 28800 checked by Cocoon, not only by botocore.
        expect_error("ValidationException", unchecked.run_microvm, imageIdentifier=facts["imageArn"], maximumDurationInSeconds=28801, status=400)


# ---------------------------------------------------------------- the end


@step("terminate", needs=["run"])
def terminate():
    ids = [facts["microvmId"], *facts.get("extra", [])]
    for microvm_id in ids:
        lmv.terminate_microvm(microvmIdentifier=microvm_id)
    for microvm_id in ids:
        assert wait_state(microvm_id, ("TERMINATED",)) == "TERMINATED"
    final = lmv.get_microvm(microvmIdentifier=facts["microvmId"])
    assert isinstance(final.get("terminatedAt"), datetime.datetime), final
    expect_error("ConflictException", lmv.create_microvm_auth_token, microvmIdentifier=facts["microvmId"], expirationInMinutes=5, allowedPorts=[{"allPorts": {}}], status=409)


@step("the gateway after terminate", needs=["terminate", "auth token and requests through the gateway"])
def gateway_after_terminate():
    status, text = gateway("/", facts["tokenAll"])
    assert status == 410, f"a terminated microVM's gateway host answers 410 Gone: HTTP {status} {text}"
    facts["terminatedStatus"] = status


print("RESULT " + json.dumps({"steps": outcomes, "facts": {k: v for k, v in facts.items() if not k.startswith("token")}}), flush=True)
sys.exit(0 if all(v == "ok" for v in outcomes.values()) else 1)
