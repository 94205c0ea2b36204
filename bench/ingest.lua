-- wrk script: POST one unique, valid packet per request (unique user/timestamp per thread and run).
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  sent = 0
  run = (os.getenv("RUN") or "") .. tostring(os.time())
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-CLIENT-TIMESTAMP"] = "2026-11-28T10:00:00Z"

function request()
  sent = sent + 1
  local stamp = os.date("!%Y-%m-%dT%H:%M:%S", 1764324000 + sent * 5)
  local body = string.format(
    '{"user_id":"bench_%s_%d_%d","session_id":"s_%d","lesson_id":"l1","system_type":"gurukul",' ..
    '"role":"student","timestamp":"%s.000Z","cognitive_state":"ON_TASK","active_seconds":4.2,' ..
    '"idle_seconds":0.8,"away_seconds":0.0,"focus_score":72,"raw_signals":{"dwell_time_ms":4000,' ..
    '"mouse_velocity":210.5,"tab_visible":true},"queued_at":"%s.002Z","retry_count":0}',
    run, id, sent % 500, id, stamp, stamp)
  return wrk.format(nil, nil, nil, body)
end
