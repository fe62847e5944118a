"""Scale out on Ray: `sodiff-batch` (a Ray Data job over a photo archive) and `sodiff-serve`
(a Ray Serve HTTP deployment); see README "Scale out".

An optional extra (`pip install '.[ray]'`): only these modules import ray, and only
when a job or a service starts; `import runtime` never does. Everything an image goes through
-- decoding, output names, collision rules, atomic writes, the report line -- is
`runtime.batch`, `runtime.imageio` and `runtime.Restorer`, unchanged.
"""
