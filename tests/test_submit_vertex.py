"""`vnca submit` through the real Vertex AI SDK (google-cloud-aiplatform) to a fake Vertex AI.

The fake is a PipelineService and MetadataService on 127.0.0.1, served over REST (plain HTTP)
and over gRPC (TLS with a self-signed certificate for localhost, which gRPC trusts through
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH). It records each request as the proto Vertex AI would
receive, so the tests below read what a submission sends: the job, its parameters, every
custom job's machine, image, timeout and TensorBoard, each task's retry and cache settings,
and the Vertex AI Experiments calls. The same server answers the SDK's Cloud Storage calls
(STORAGE_EMULATOR_HOST): the bucket is reported missing, as for a new project, and is
"created". Nothing is monkeypatched: `vnca submit` runs as typed, with the SDK set up first
by `aiplatform.init(credentials=AnonymousCredentials(), api_endpoint=..., api_transport=...)`,
which `submit()` keeps (pipeline/submit.py).

What only a real Google Cloud project can show (IAM, quota, TPU capacity, image pulls, that
Vertex AI's backend accepts the spec and runs it) is listed in docs/running.md.
"""

import datetime
import http.server
import ipaddress
import json
import os
import re
import threading
import urllib.parse
from concurrent import futures

import grpc
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform import initializer
from google.cloud.aiplatform_v1 import types as v1
from google.protobuf import json_format

from vnca import config
from vnca_pipeline import cli
from vnca_pipeline.variants import CONFIG_DIR, DEFAULT_VARIANTS, load_variants

PROJECT, REGION = "vnca-test", "europe-west4"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
BUCKET = "vnca-test-runs"
PIPELINE_ROOT = f"gs://{BUCKET}/vnca"
SERVICE_ACCOUNT = f"vnca-runner@{PROJECT}.iam.gserviceaccount.com"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/vnca/vnca-python-tpu:3f2a1bc"
TENSORBOARD = f"{PARENT}/tensorboards/4242"
EXPERIMENT = "vnca-paper"
OVERRIDES = ["train.seed=7", "hardware.timeout_hours=6", "hardware.retries=2"]

# The RPCs the SDK makes for a submission with an experiment: (request, response) types.
RPCS = {
    "google.cloud.aiplatform.v1.PipelineService": {
        "CreatePipelineJob": (v1.CreatePipelineJobRequest, v1.PipelineJob),
        "GetPipelineJob": (v1.GetPipelineJobRequest, v1.PipelineJob),
    },
    "google.cloud.aiplatform.v1.MetadataService": {
        "GetMetadataStore": (v1.GetMetadataStoreRequest, v1.MetadataStore),
        "GetContext": (v1.GetContextRequest, v1.Context),
        "CreateContext": (v1.CreateContextRequest, v1.Context),
        "AddContextChildren": (v1.AddContextChildrenRequest, v1.AddContextChildrenResponse),
    },
}
TYPES = {method: types for service in RPCS.values() for method, types in service.items()}


# The HTTP status of each gRPC status code the fake answers with.
HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403}


class Refusal(Exception):
    """An error status the fake answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class FakeVertex:
    """The state of a fake Vertex AI served over `transport`: every request it was sent, by RPC
    name, the transports they came by, and the jobs and metadata contexts it holds. `refuse`
    (an RPC name -> Refusal) makes an RPC fail."""

    def __init__(self, transport: str):
        self.transport = transport
        self.requests: list[tuple[str, object]] = []
        self.transports: set[str] = set()
        self.storage: list[tuple[str, str]] = []
        self.jobs: dict[str, v1.PipelineJob] = {}
        self.contexts: dict[str, v1.Context] = {}
        self.refuse: dict[str, Refusal] = {}
        self.lock = threading.Lock()

    def call(self, method: str, request, transport: str):
        with self.lock:
            self.requests.append((method, request))
            self.transports.add(transport)
            if method in self.refuse:
                raise self.refuse[method]
            return getattr(self, method)(request)

    def sent(self, method: str) -> list:
        return [r for m, r in self.requests if m == method]

    def CreatePipelineJob(self, req):
        job = v1.PipelineJob(req.pipeline_job)
        job.name = f"{req.parent}/pipelineJobs/{req.pipeline_job_id}"
        job.state = v1.PipelineState.PIPELINE_STATE_PENDING
        job.create_time = datetime.datetime.now(datetime.UTC)
        job.job_detail = v1.PipelineJobDetail(pipeline_run_context=v1.Context(
            name=f"{req.parent}/metadataStores/default/contexts/{req.pipeline_job_id}",
            schema_title="system.PipelineRun"))
        self.jobs[job.name] = job
        return job

    def GetPipelineJob(self, req):
        if req.name not in self.jobs:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"{req.name} not found")
        self.jobs[req.name].state = v1.PipelineState.PIPELINE_STATE_RUNNING
        return self.jobs[req.name]

    def GetMetadataStore(self, req):
        return v1.MetadataStore(name=req.name)

    def GetContext(self, req):
        if req.name not in self.contexts:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"{req.name} not found")
        return self.contexts[req.name]

    def CreateContext(self, req):
        ctx = v1.Context(req.context)
        ctx.name = f"{req.parent}/contexts/{req.context_id}"
        self.contexts[ctx.name] = ctx
        return ctx

    def AddContextChildren(self, req):
        return v1.AddContextChildrenResponse()


# -- REST: the routes of google/cloud/aiplatform/v1's HTTP bindings that the SDK calls ----------

_LOC = r"projects/[^/]+/locations/[^/]+"
_STORE = rf"{_LOC}/metadataStores/[^/]+"
REST_ROUTES = [  # (HTTP method, path, RPC, the field the path fills, the field the body fills)
    ("POST", rf"/v1/(?P<parent>{_LOC})/pipelineJobs", "CreatePipelineJob", "pipeline_job"),
    ("GET", rf"/v1/(?P<name>{_LOC}/pipelineJobs/[^/]+)", "GetPipelineJob", None),
    ("GET", rf"/v1/(?P<name>{_STORE})", "GetMetadataStore", None),
    ("GET", rf"/v1/(?P<name>{_STORE}/contexts/[^/:]+)", "GetContext", None),
    ("POST", rf"/v1/(?P<parent>{_STORE})/contexts", "CreateContext", "context"),
    ("POST", rf"/v1/(?P<context>{_STORE}/contexts/[^/:]+):addContextChildren",
     "AddContextChildren", "*"),
]
# Query parameters (camelCase) that are request fields.
QUERY_FIELDS = {"pipelineJobId": "pipeline_job_id", "contextId": "context_id"}


def _parse(body: bytes, message_type):
    """The JSON body as `message_type`, parsed strictly (an unknown field is an error)."""
    pb = message_type.pb(message_type())
    json_format.Parse(body, pb)
    return message_type.wrap(pb)


def _rest_request(method: str, path: str, query: dict, body: bytes):
    """(RPC name, request) of a REST call, or None for a path the fake does not serve."""
    for verb, pattern, rpc, body_field in REST_ROUTES:
        match = re.fullmatch(pattern, path)
        if verb != method or not match:
            continue
        request_type = TYPES[rpc][0]
        request = _parse(body, request_type) if body_field == "*" else request_type()
        if body_field and body_field != "*":
            setattr(request, body_field, _parse(body, type(getattr(request, body_field))))
        for key, value in match.groupdict().items():
            setattr(request, key, value)
        for key, values in query.items():
            if key in QUERY_FIELDS:
                setattr(request, QUERY_FIELDS[key], values[0])
        return rpc, request
    return None


def _handler(fake: FakeVertex):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict | str) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path.startswith("/storage/v1/"):
                return self._storage(url.path, body)
            routed = _rest_request(self.command, url.path, urllib.parse.parse_qs(url.query), body)
            if routed is None:
                return self._reply(404, {"error": {"code": 404, "status": "NOT_FOUND",
                                                   "message": f"fake: no route {url.path}"}})
            try:
                response = fake.call(*routed, "rest")
            except Refusal as r:
                return self._reply(HTTP_STATUS[r.code], {"error": {
                    "code": HTTP_STATUS[r.code], "status": r.code.name, "message": r.message}})
            self._reply(200, json_format.MessageToJson(type(response).pb(response)))

        def _storage(self, path: str, body: bytes) -> None:
            """Cloud Storage's JSON API, as far as the SDK's bucket check goes: the bucket
            is missing, is created, and takes an IAM policy."""
            fake.storage.append((self.command, path))
            if self.command == "GET" and path == f"/storage/v1/b/{BUCKET}":
                return self._reply(404, {"error": {"code": 404, "message": "no such bucket"}})
            if self.command == "GET" and path.endswith("/iam"):
                return self._reply(200, {"kind": "storage#policy", "bindings": []})
            return self._reply(200, json.loads(body or b"{}"))

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, *args):
            pass

    return Handler


# -- gRPC ---------------------------------------------------------------------------------------


def _grpc_handlers(fake: FakeVertex) -> list:
    def unary(rpc: str):
        request_type, response_type = TYPES[rpc]

        def behaviour(request, context):
            try:
                return fake.call(rpc, request, "grpc")
            except Refusal as r:
                context.abort(r.code, r.message)

        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=request_type.deserialize,
            response_serializer=response_type.serialize)

    return [grpc.method_handlers_generic_handler(service, {rpc: unary(rpc) for rpc in rpcs})
            for service, rpcs in RPCS.items()]


@pytest.fixture(scope="session")
def localhost_tls(tmp_path_factory):
    """(key PEM, certificate PEM) for localhost, trusted by every gRPC channel of this process:
    gRPC reads GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once, when it opens its first TLS channel."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    roots = tmp_path_factory.mktemp("tls") / "localhost.pem"
    roots.write_bytes(cert_pem)
    before = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(roots)
    yield key_pem, cert_pem
    if before is None:
        os.environ.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", None)
    else:
        os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = before


@pytest.fixture
def sdk_config():
    """The Vertex AI SDK's global configuration, as it was, after the test."""
    saved = dict(vars(initializer.global_config))
    yield initializer.global_config
    vars(initializer.global_config).clear()
    vars(initializer.global_config).update(saved)


@pytest.fixture(params=["rest", "grpc"])
def vertex(request, monkeypatch, sdk_config, localhost_tls):
    """A fake Vertex AI that the SDK talks to over `request.param`; yields its FakeVertex."""
    fake = FakeVertex(request.param)
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    threading.Thread(target=http_server.serve_forever, args=(0.05,), daemon=True).start()
    http_endpoint = f"http://127.0.0.1:{http_server.server_address[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", http_endpoint)
    grpc_server = None
    if request.param == "grpc":
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  handlers=_grpc_handlers(fake))
        port = grpc_server.add_secure_port(
            "localhost:0", grpc.ssl_server_credentials([localhost_tls]))
        grpc_server.start()
        endpoint = f"localhost:{port}"
    else:
        endpoint = http_endpoint
    aiplatform.init(credentials=AnonymousCredentials(), api_endpoint=endpoint,
                    api_transport=request.param)
    yield fake
    if grpc_server is not None:
        grpc_server.stop(grace=None)
    http_server.shutdown()
    http_server.server_close()


def _submit(capsys, *extra: str) -> tuple[int, str, str]:
    rc = cli.main(["submit", "--project", PROJECT, "--region", REGION,
                   "--pipeline-root", PIPELINE_ROOT, "--service-account", SERVICE_ACCOUNT,
                   "--image", IMAGE, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _job(fake: FakeVertex) -> tuple[v1.CreatePipelineJobRequest, dict]:
    """The one CreatePipelineJobRequest sent, and its pipeline job as Vertex AI's JSON."""
    [request] = fake.sent("CreatePipelineJob")
    return request, json_format.MessageToDict(v1.PipelineJob.pb(request.pipeline_job))


def _components_of_tasks(spec: dict) -> dict[str, dict]:
    tasks = spec["root"]["dag"]["tasks"]
    return {name: spec["components"][task["componentRef"]["name"]]
            for name, task in tasks.items()}


def _defaults(component: dict) -> dict:
    params = component.get("inputDefinitions", {}).get("parameters", {})
    return {name: p.get("defaultValue") for name, p in params.items()}


def test_submit_sends_vertex_ai_the_whole_job(vertex, capsys):
    rc, out, err = _submit(capsys, "--tensorboard", TENSORBOARD, "--experiment", EXPERIMENT,
                           *[a for o in OVERRIDES for a in ("--set", o)])
    assert rc == 0, err
    request, job = _job(vertex)
    assert vertex.transports == {vertex.transport}

    # Where, who, which job.
    assert request.parent == PARENT
    job_id = request.pipeline_job_id
    assert re.fullmatch(r"vnca-\d{8}-\d{6}-\d{6}", job_id)
    assert f"submitted {PARENT}/pipelineJobs/{job_id}\n" in out
    assert job["displayName"] == "vnca"
    assert job["serviceAccount"] == SERVICE_ACCOUNT
    assert job["labels"] == {"app": "vnca", "target": "vertex-tpu"}
    runtime = job["runtimeConfig"]
    assert runtime["gcsOutputDirectory"] == PIPELINE_ROOT

    # The parameters: each variant's config with the overrides, and the full data.
    params = runtime["parameterValues"]
    assert {k: params[k] for k in ("data_source", "raw_dir", "download", "tfds_dir")} == {
        "data_source": "raw", "raw_dir": "", "download": True, "tfds_dir": ""}
    variants = load_variants(None, "paper", OVERRIDES)
    assert sorted(params) == sorted(["data_source", "raw_dir", "download", "tfds_dir"]
                                    + [f"config_{v.name}" for v in variants])
    for v in variants:
        assert config.loads(params[f"config_{v.name}"]) == v.config
        assert v.config.train.seed == 7

    # Every variant's train and evaluate: a custom job on its TPU slice, in the image, with the
    # timeout and retries of its config; train streams to the TensorBoard, evaluate does not.
    spec = job["pipelineSpec"]
    tasks, components = spec["root"]["dag"]["tasks"], _components_of_tasks(spec)
    assert sorted(tasks) == sorted(["prepare-data", "report"]
                                   + [f"{s}-{n}" for n in DEFAULT_VARIANTS
                                      for s in ("train", "evaluate")])
    for v in variants:
        hw = v.config.hardware
        for step in ("train", "evaluate"):
            task = f"{step}-{v.name}"
            defaults = _defaults(components[task])
            [pool] = defaults["worker_pool_specs"]
            assert pool["machine_spec"] == {"machine_type": hw.tpu_machine_type,
                                            "tpu_topology": hw.tpu_topology}
            assert pool["replica_count"] == 1.0  # protobuf Struct numbers are floats
            assert pool["container_spec"]["image_uri"] == IMAGE
            assert f"def {step}(" in " ".join(pool["container_spec"]["command"])
            assert defaults["timeout"] == "21600s"  # hardware.timeout_hours=6
            assert defaults["service_account"] == "{{$.pipeline_service_account}}"
            if step == "train":
                assert defaults["tensorboard"] == TENSORBOARD
                assert defaults["base_output_directory"] == (
                    f"{PIPELINE_ROOT}/{job_id}/tensorboard/train-{v.name}")
            else:
                assert defaults["tensorboard"] == ""
                assert defaults["base_output_directory"] == ""
            assert tasks[task]["retryPolicy"] == {
                "maxRetryCount": 2, "backoffDuration": "300s", "backoffFactor": 2.0,
                "backoffMaxDuration": "3600s"}
    for task in ("prepare-data", "report"):
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2
        assert "worker_pool_specs" not in _defaults(components[task])

    # Caching: as compiled, only prepare-data may reuse an earlier run's outputs.
    assert {n: t.get("cachingOptions", {}).get("enableCache", False)
            for n, t in tasks.items()} == {n: n == "prepare-data" for n in tasks}

    # The experiment: created under the default metadata store, the run added to it.
    store = f"{PARENT}/metadataStores/default"
    [created] = vertex.sent("CreateContext")
    assert (created.parent, created.context_id) == (store, EXPERIMENT)
    assert created.context.schema_title == "system.Experiment"
    [added] = vertex.sent("AddContextChildren")
    assert added.context == f"{store}/contexts/{EXPERIMENT}"
    assert list(added.child_contexts) == [f"{store}/contexts/{job_id}"]
    # The SDK's bucket check found the pipeline root's bucket missing and created it.
    assert ("POST", "/storage/v1/b") in vertex.storage


@pytest.mark.parametrize("vertex", ["rest"], indirect=True)
def test_no_cache_turns_the_cache_off_for_every_step(vertex, capsys):
    rc, _, err = _submit(capsys, "--no-cache")
    assert rc == 0, err
    _, job = _job(vertex)
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    assert len(tasks) == 8
    assert all(t.get("cachingOptions", {}).get("enableCache", False) is False
               for t in tasks.values())
    # No experiment, no TensorBoard: no metadata calls, no TensorBoard on any custom job.
    assert [m for m, _ in vertex.requests] == ["CreatePipelineJob"]
    components = _components_of_tasks(job["pipelineSpec"])
    assert all(_defaults(c).get("tensorboard", "") == "" for c in components.values())


def test_a_refused_job_is_one_line(vertex, capsys):
    vertex.refuse["CreatePipelineJob"] = Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        f"Permission 'aiplatform.pipelineJobs.create' denied on resource '{PARENT}'")
    rc, _, err = _submit(capsys, "--config", str(CONFIG_DIR / "doubling.yaml"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("vnca submit: error: Vertex AI refused the job: 403 ")
    assert "aiplatform.pipelineJobs.create" in err


@pytest.mark.parametrize("vertex", ["rest"], indirect=True)
def test_an_experiment_vertex_ai_refuses_stops_the_submission(vertex, capsys):
    vertex.refuse["GetMetadataStore"] = Refusal(
        grpc.StatusCode.PERMISSION_DENIED, "Permission 'aiplatform.metadataStores.get' denied")
    rc, _, err = _submit(capsys, "--config", str(CONFIG_DIR / "doubling.yaml"), "--experiment", EXPERIMENT)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"vnca submit: error: --experiment {EXPERIMENT}: 403 ")
    assert "aiplatform.metadataStores.get" in err
    assert vertex.sent("CreatePipelineJob") == []  # nothing was submitted


@pytest.mark.parametrize("vertex", ["rest"], indirect=True)
def test_a_job_submitted_but_not_added_to_the_experiment_is_named(vertex, capsys):
    vertex.refuse["AddContextChildren"] = Refusal(
        grpc.StatusCode.PERMISSION_DENIED, "Permission 'aiplatform.contexts.update' denied")
    rc, _, err = _submit(capsys, "--config", str(CONFIG_DIR / "doubling.yaml"), "--experiment",
                         EXPERIMENT)
    assert rc == 2 and err.count("\n") == 1, err
    [request] = vertex.sent("CreatePipelineJob")
    assert err.startswith(
        f"vnca submit: error: submitted {PARENT}/pipelineJobs/{request.pipeline_job_id}, but it "
        f"could not be added to experiment {EXPERIMENT}: ")


@pytest.mark.parametrize(("args", "message"), [
    (["--tensorboard", "my-tensorboard"], "expected a resource name projects/PROJECT/locations/"),
    (["--tensorboard", f"projects/{PROJECT}/locations/us-central1/tensorboards/1"],
     "the TensorBoard is in us-central1, the job in --region europe-west4"),
    (["--experiment", "Paper Run"], "4 to 128 characters of a-z, 0-9 and '-'"),
    (["--region", "mars-north1"], "--region mars-north1: "),
])
def test_bad_vertex_options_are_refused_in_one_line_before_any_call(args, message, capsys,
                                                                     sdk_config):
    rc = cli.main(["submit", "--project", PROJECT, "--region", REGION,
                   "--pipeline-root", PIPELINE_ROOT, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("vnca submit: error: ") and message in err
