# cmake -DSOURCE_DIR=... -DMD=... -DOUT=... -P extract_one.cmake: extracts one Markdown file's blocks.
include(${SOURCE_DIR}/cmake/doc_snippets.cmake)
set(found "")
hmmkit_extract_snippets(${MD} ${OUT} found)
