"""Run a deployed workflow with the blocking client, alone and twice in one session."""

from conveyor import BlockingClient

if __name__ == "__main__":
    with BlockingClient() as client:
        print(client.run("my_workflow", arg1="hello_world"))
        session_id = client.create_session()["session_id"]
        print(client.run("my_workflow", session_id=session_id, arg1="in_a_session"))
        print(len(client.list_tasks(session_id=session_id)), "task in the session")
