-- wrk script: the karma API stub's ceiling; POST one log-action call per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"user_id": "stu_1", "action": "completing_lessons", "intensity": 0.8, "note": "bench"}'
