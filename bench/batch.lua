-- wrk script: POST batch envelopes of BATCH unique packets (env BATCH, default 100).
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  sent = 0
  run = (os.getenv("RUN") or "") .. tostring(os.time())
  size = tonumber(os.getenv("BATCH") or "100")
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-PRANA-BATCH-ID"] = "bench"

function request()
  local parts = {}
  for i = 1, size do
    sent = sent + 1
    local stamp = os.date("!%Y-%m-%dT%H:%M:%S", 1764324000 + sent * 5)
    parts[i] = string.format(
      '{"user_id":"bb_%s_%d_%d","session_id":"s","system_type":"gurukul","timestamp":"%s.000Z",' ..
      '"cognitive_state":"ON_TASK","active_seconds":5.0,"idle_seconds":0.0,"away_seconds":0.0,' ..
      '"focus_score":80,"raw_signals":{"tab_visible":true}}',
      run, id, sent % 1000, stamp)
  end
  local body = '{"packets":[' .. table.concat(parts, ",") .. '],"batch_size":' .. size .. '}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("unexpected status " .. status .. "\n")
  end
end
