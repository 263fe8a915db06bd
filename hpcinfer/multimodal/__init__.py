"""Images in, text out (issue 24; docs/vision.md).

Where each part lives (DESIGN §7a: images are a model input):

- ``media``: images from what users pass (PIL images, OpenAI-style ``image_url`` parts with a
  data: URL or a local file, ``image_pil`` parts), and each image's content hash; for jobs,
  local files only from ``input.media_dirs`` (``open_local_image``) and ``MediaError`` kinds
  that become bad rows (the rows' side is hpcinfer/io/images.py).
- ``processor``: the checkpoint's transformers ``AutoProcessor`` expands the placeholders,
  preprocesses the images and renders chat templates, so token ids and pixels are exactly the
  model's; it returns a ``ProcessedPrompt`` whose ``MultiModalInputs`` say where each image's
  placeholder tokens are.
- ``inputs``: those records, and the extra keys that make the prefix-cache hash of a block
  depend on the images whose placeholders it holds.
- ``step``: which rows of a step's flattened batch take image embeddings, and running the
  vision encoder for images a step reaches whose embeddings are not cached yet.

A model that takes images sets ``takes_images = True`` and has ``image_token_id``,
``image_token_counts(image_inputs) -> list[int]``, ``encode_images(image_inputs) ->
list[Tensor[num_tokens, hidden]]`` and ``forward(..., image_embeds=(rows, embeddings))``,
and ``pixel_dtype``: the dtype its encoder casts floating image inputs to before anything
else (the processor casts them on its threads, so a step moves bf16, not fp32, pixels).
"""
