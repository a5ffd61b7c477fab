"""prepare-data step: binarized MNIST with matched labels -> a Dataset artifact (dataset.npz).

On Vertex AI a `gs://` raw or TFDS directory is read through its `/gcs/` mount; by default
the Vertex pipeline downloads the raw files (`--source raw --download`) into a scratch folder.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from vnca_pipeline.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(
    dataset: Output[Dataset],
    source: str = "bundled",
    raw_dir: str = "",
    download: bool = False,
    tfds_dir: str = "",
):
    """Write dataset.npz (+ match report) for `source` ('bundled', 'raw' or 'tfds').

    With `download` and no `raw_dir`, the raw files are fetched into a scratch directory.
    """
    import tempfile

    from vnca.data.prepare import prepare_data as prepare
    from vnca.storage import mounted_path

    raw = mounted_path(raw_dir) or (tempfile.mkdtemp(prefix="vnca-raw-") if download else None)
    report = prepare(source=source, out_dir=dataset.path, raw_dir=raw, download=download,
                     tfds_dir=mounted_path(tfds_dir))
    dataset.metadata["source"] = source
    dataset.metadata["summary"] = report.summary
