"""``gcp-storage-emulator`` with the generation headers real GCS sends on every object download.

GCS answers a media download with ``x-goog-generation`` and ``x-goog-metageneration``;
tensorstore (which orbax writes and reads arrays with) takes an object's
generation from them and refuses a read without ("Malformed StorageGeneration").
The emulator 2026.7.19 omits them; this adds them and runs its command line:

    python benchmarks/gcs_server.py start --host 127.0.0.1 --port PORT --in-memory
"""

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the emulator has answered 404 already
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routing table from it

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main()
