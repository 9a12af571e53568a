"""fastsft/use/serve/protocol.py: a request body read into checked parameters, without a server."""

import pytest

from fastsft.use.serve.protocol import APIError, ServeSettings, parse_params


@pytest.mark.parametrize("bad", [[], "", 0, [{"include_usage": True}]])
def test_stream_options_that_are_not_an_object_are_refused(bad):
    """`stream_options: []` was read as 'no options' (an empty list is falsy): refused like any non-object."""
    with pytest.raises(APIError) as e:
        parse_params({"stream": True, "stream_options": bad}, ServeSettings(), chat=True)
    assert e.value.status == 400 and e.value.param == "stream_options"


@pytest.mark.parametrize("fine", [None, {}, {"include_usage": True}])
def test_stream_options_absent_or_an_object_are_read(fine):
    body = {"stream": True} if fine is None else {"stream": True, "stream_options": fine}
    assert parse_params(body, ServeSettings(), chat=True).stream


def test_content_parts_are_read_by_the_one_message_reader():
    """OpenAI's text parts are joined as training rows', `eval --data`'s and generate's are
    (fastsft.data.formats.text_of_parts); another part type is a 400 naming it."""
    from fastsft.use.serve.protocol import parse_messages

    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    assert parse_messages({"messages": [{"role": "user", "content": parts}]}) == [
        {"role": "user", "content": "hi\nthere"}
    ]
    with pytest.raises(APIError, match="content part 1 is of type 'image_url'") as e:
        parse_messages({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert e.value.status == 400
