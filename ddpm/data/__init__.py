"""Data sets for diffusion training: download, extract, and the prepared-split format.

Import from the modules (this package file imports nothing, so that a stage that reads a
prepared split does not load, and depend on, every data set's reader)::

    ddpm.data.download.download(url, dest, md5, *, retries=4, backoff=1.0, ...) -> Path
        Resumable (HTTP Range), retrying (exponential backoff), md5-verified, atomic download;
        no network I/O at all when ``dest`` is already there with the right md5.
    ddpm.data.sources.resolve_source(dataset, url="", md5="") -> Source | None
        The archive (url, filename, md5) a data set comes from; a mirror overrides url/md5.
    ddpm.data.build.build_dataset(DataRequest(dataset, image_size, seed, ...)) -> Extracted
        Any data set of DATASETS as arrays: ``Extracted(splits={"train", "val"}, class_names,
        info)``, each split a ``Split(images uint8 [N, H, W, 3], labels int64 [N])``.
    ddpm.data.prepared.write_prepared(out_dir, extracted) -> manifest dict
        Writes the prepared folder atomically (temporary sibling folder, then rename).
    ddpm.data.prepared.load_prepared(root, split="train") -> PreparedSplit(images, labels, ...)
        ``images``: uint8 tensor [N, H, W, 3] (one read); ``labels``: int64 tensor [N]
        (-1 where the data has no classes); ``manifest``: the folder's manifest.json.

Data sets (:data:`DATASETS`):

- ``cifar10-cars``: the 5,000 automobiles of CIFAR-10's training batches, 4,250 train / 750 val
  by a seeded shuffle (:mod:`ddpm.data.cifar10`).
- ``cifar10``: all ten classes, train = the 50,000 training images, val = the published test
  batch of 10,000.
- ``tiny-imagenet``: 100,000 train / 10,000 val images of 200 classes at 64x64
  (:mod:`ddpm.data.tiny_imagenet`).
- ``imagefolder``: the user's own images, class subfolders as labels
  (:mod:`ddpm.data.imagefolder`).
- ``synthetic``: coloured, textured shapes generated from the seed, no network
  (:mod:`ddpm.data.synthetic`).

Archive data sets are prepared at their published size or downscaled, never upscaled. All
problems the user can fix raise a :class:`DataError` whose message names the file or value
and the fix. Augmentation belongs to training, not here.
"""
