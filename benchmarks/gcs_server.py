"""``gcp-storage-emulator`` with the generation headers real GCS sends on every object download.

GCS answers a media download with ``x-goog-generation`` and ``x-goog-metageneration``;
tensorstore (which orbax writes and reads arrays with) takes an object's
generation from them and refuses a read without ("Malformed StorageGeneration").
The emulator 2026.7.19 omits them; this adds them. It also raises socketserver's
listen backlog from 5 to 128: the emulator serves one connection at a time and
closes each, so with more than ~5 reads in flight (8 decoding threads) new
connections waited out the 1 s SYN retransmit (8-thread reads fell from ~950 to
~150 objects/s), a limit of the server, not of a real bucket. Then it runs the
emulator's command line:

    python benchmarks/gcs_server.py start --host 127.0.0.1 --port PORT --in-memory
"""

import socketserver

from gcp_storage_emulator.handlers import objects

socketserver.TCPServer.request_queue_size = 128

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
